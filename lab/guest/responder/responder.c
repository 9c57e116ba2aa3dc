/*
 * mlab-responder: the network end of the client probes, run in the guest
 * next to the memory workload.
 *
 * UDP echo (default port 7007): for a request of at least 24 bytes that
 * starts with the magic "MLPE", the reply is its first 24 bytes followed by
 * the guest's CLOCK_MONOTONIC time of receipt in ns, as a big-endian uint64
 * (32 bytes in all). The harness uses that time to put the guest's console
 * reports on its own clock. Other datagrams are dropped.
 *
 * TCP echo (default port 7008): every byte received on a connection is
 * sent back on it, in order. Up to MAX_CLIENTS connections at a time; each
 * has a buffer of BUFFER_BYTES, and the responder stops reading from a
 * connection while its buffer is full, so TCP flow control slows a client
 * that sends faster than it reads.
 *
 * Console lines (stdout, one write per line):
 *   mlab-responder: listening udp=<port> tcp=<port>
 *   mlab-responder: error <what failed>
 *
 * Options, for testing on a build host (the guest passes none):
 *   --bind=ADDR       IPv4 address to listen on (default 0.0.0.0)
 *   --udp-port=N      UDP port, 0 for any free port (default 7007)
 *   --tcp-port=N      TCP port, 0 for any free port (default 7008)
 *
 * Exit status: 1 when a socket cannot be set up, 2 for an invalid option.
 * Otherwise it never exits.
 *
 * Build: gcc -static -O2 -o mlab-responder responder.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ECHO_MAGIC "MLPE"
#define ECHO_REQUEST_BYTES 24
#define ECHO_REPLY_BYTES 32
#define DEFAULT_UDP_PORT 7007
#define DEFAULT_TCP_PORT 7008
#define MAX_CLIENTS 8
#define BUFFER_BYTES 65536
/* Datagrams read per poll wakeup before the TCP connections get a turn. */
#define MAX_DATAGRAMS_PER_WAKEUP 64

#define EXIT_SETUP_FAILED 1
#define EXIT_INVALID_OPTION 2

struct client {
	int fd; /* -1 when the slot is free */
	size_t pending;
	unsigned char buffer[BUFFER_BYTES];
};

static struct client clients[MAX_CLIENTS];

static void print_line(const char *format, ...)
{
	va_list args;

	fputs("mlab-responder: ", stdout);
	va_start(args, format);
	vprintf(format, args);
	va_end(args);
	fputc('\n', stdout);
	fflush(stdout);
}

static uint64_t monotonic_ns(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
}

static void put_be64(unsigned char *out, uint64_t value)
{
	for (int i = 7; i >= 0; i--) {
		out[i] = (unsigned char)(value & 0xff);
		value >>= 8;
	}
}

static int parse_port(const char *name, const char *text)
{
	char *end;
	long value;

	errno = 0;
	value = strtol(text, &end, 10);
	if (errno != 0 || end == text || *end != '\0' || value < 0 || value > 65535) {
		print_line("error invalid %s '%s': use a port number from 0 to 65535", name, text);
		exit(EXIT_INVALID_OPTION);
	}
	return (int)value;
}

static int set_nonblocking(int fd)
{
	int flags = fcntl(fd, F_GETFL);

	return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static int open_socket(int type, struct in_addr address, int port)
{
	struct sockaddr_in local = {.sin_family = AF_INET, .sin_addr = address,
				    .sin_port = htons((uint16_t)port)};
	int one = 1;
	int fd = socket(AF_INET, type, 0);

	if (fd < 0) {
		print_line("error socket() failed: %s", strerror(errno));
		exit(EXIT_SETUP_FAILED);
	}
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&local, sizeof(local)) < 0) {
		print_line("error bind to %s port %d failed: %s", inet_ntoa(address), port,
			   strerror(errno));
		exit(EXIT_SETUP_FAILED);
	}
	if (type == SOCK_STREAM && listen(fd, MAX_CLIENTS) < 0) {
		print_line("error listen() failed: %s", strerror(errno));
		exit(EXIT_SETUP_FAILED);
	}
	if (set_nonblocking(fd) < 0) {
		print_line("error fcntl(O_NONBLOCK) failed: %s", strerror(errno));
		exit(EXIT_SETUP_FAILED);
	}
	return fd;
}

static int bound_port(int fd)
{
	struct sockaddr_in local;
	socklen_t length = sizeof(local);

	if (getsockname(fd, (struct sockaddr *)&local, &length) < 0)
		return -1;
	return ntohs(local.sin_port);
}

static void answer_datagrams(int fd)
{
	unsigned char request[256];
	unsigned char reply[ECHO_REPLY_BYTES];
	struct sockaddr_in peer;

	for (int i = 0; i < MAX_DATAGRAMS_PER_WAKEUP; i++) {
		socklen_t peer_length = sizeof(peer);
		ssize_t length = recvfrom(fd, request, sizeof(request), 0, (struct sockaddr *)&peer,
					  &peer_length);
		uint64_t received_ns = monotonic_ns();

		if (length < 0)
			return; /* EAGAIN: nothing left to read */
		if (length < ECHO_REQUEST_BYTES || memcmp(request, ECHO_MAGIC, 4) != 0)
			continue;
		memcpy(reply, request, ECHO_REQUEST_BYTES);
		put_be64(reply + ECHO_REQUEST_BYTES, received_ns);
		/* A reply that does not fit the send buffer is dropped, like a lost
		 * datagram: the client counts it as a lost request. */
		sendto(fd, reply, sizeof(reply), 0, (struct sockaddr *)&peer, peer_length);
	}
}

static void accept_clients(int listener)
{
	for (;;) {
		int one = 1;
		int fd = accept(listener, NULL, NULL);
		int slot = -1;

		if (fd < 0)
			return;
		for (int i = 0; i < MAX_CLIENTS; i++) {
			if (clients[i].fd < 0) {
				slot = i;
				break;
			}
		}
		if (slot < 0 || set_nonblocking(fd) < 0) {
			print_line("error connection refused: %s",
				   slot < 0 ? "all connection slots are in use" : strerror(errno));
			close(fd);
			continue;
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		clients[slot].fd = fd;
		clients[slot].pending = 0;
	}
}

static void close_client(struct client *client)
{
	close(client->fd);
	client->fd = -1;
	client->pending = 0;
}

/* Read what fits into the buffer, then send as much of the buffer as the
 * socket takes. Closes the connection on end of file or an error. */
static void serve_client(struct client *client, short revents)
{
	if (revents & (POLLIN | POLLHUP | POLLERR)) {
		size_t room = BUFFER_BYTES - client->pending;

		if (room > 0) {
			ssize_t length = recv(client->fd, client->buffer + client->pending, room, 0);

			if (length == 0 || (length < 0 && errno != EAGAIN && errno != EINTR)) {
				close_client(client);
				return;
			}
			if (length > 0)
				client->pending += (size_t)length;
		}
	}
	if (client->pending > 0) {
		ssize_t sent = send(client->fd, client->buffer, client->pending, MSG_NOSIGNAL);

		if (sent < 0 && errno != EAGAIN && errno != EINTR) {
			close_client(client);
			return;
		}
		if (sent > 0) {
			memmove(client->buffer, client->buffer + sent, client->pending - (size_t)sent);
			client->pending -= (size_t)sent;
		}
	}
}

int main(int argc, char **argv)
{
	struct in_addr address = {.s_addr = htonl(INADDR_ANY)};
	int udp_port = DEFAULT_UDP_PORT;
	int tcp_port = DEFAULT_TCP_PORT;

	for (int i = 1; i < argc; i++) {
		if (strncmp(argv[i], "--bind=", 7) == 0) {
			if (inet_pton(AF_INET, argv[i] + 7, &address) != 1) {
				print_line("error invalid --bind '%s': use an IPv4 address", argv[i] + 7);
				return EXIT_INVALID_OPTION;
			}
		} else if (strncmp(argv[i], "--udp-port=", 11) == 0) {
			udp_port = parse_port("--udp-port", argv[i] + 11);
		} else if (strncmp(argv[i], "--tcp-port=", 11) == 0) {
			tcp_port = parse_port("--tcp-port", argv[i] + 11);
		} else {
			print_line("error unknown option '%s'", argv[i]);
			return EXIT_INVALID_OPTION;
		}
	}
	signal(SIGPIPE, SIG_IGN);
	for (int i = 0; i < MAX_CLIENTS; i++)
		clients[i].fd = -1;

	int udp = open_socket(SOCK_DGRAM, address, udp_port);
	int listener = open_socket(SOCK_STREAM, address, tcp_port);

	print_line("listening udp=%d tcp=%d", bound_port(udp), bound_port(listener));

	for (;;) {
		struct pollfd fds[2 + MAX_CLIENTS];
		int owner[2 + MAX_CLIENTS];
		nfds_t count = 0;

		fds[count++] = (struct pollfd){.fd = udp, .events = POLLIN};
		fds[count++] = (struct pollfd){.fd = listener, .events = POLLIN};
		for (int i = 0; i < MAX_CLIENTS; i++) {
			short events = 0;

			if (clients[i].fd < 0)
				continue;
			if (clients[i].pending < BUFFER_BYTES)
				events |= POLLIN;
			if (clients[i].pending > 0)
				events |= POLLOUT;
			owner[count] = i;
			fds[count++] = (struct pollfd){.fd = clients[i].fd, .events = events};
		}
		if (poll(fds, count, -1) < 0) {
			if (errno == EINTR)
				continue;
			print_line("error poll() failed: %s", strerror(errno));
			sleep(1);
			continue;
		}
		if (fds[0].revents)
			answer_datagrams(udp);
		if (fds[1].revents)
			accept_clients(listener);
		for (nfds_t i = 2; i < count; i++) {
			if (fds[i].revents)
				serve_client(&clients[owner[i]], fds[i].revents);
		}
	}
}
