/*
 * mlab-workload: the memory workload that runs as the only program of a
 * migration-lab guest.
 *
 * It reads its settings from the kernel command line (/proc/cmdline):
 *   mlab.wss=<MiB>       working set size, a whole number of MiB (default 64)
 *   mlab.rate=<MiB/s>    dirty rate, 0 means as fast as possible (default 8)
 *   mlab.pattern=<name>  sequential or random (default sequential)
 *
 * It writes every page of the working set once, prints a ready line, then
 * rewrites pages at the requested rate in 10 ms slices. Every page carries a
 * header (PAGE_MAGIC XOR page index, then a generation counter) and a fill
 * derived from (index, generation). The expected generation of each page is
 * kept in a separate array, so a page that was lost (zeroed) or is stale
 * (an older generation) after a migration is detected:
 *   - in full, right before the page is rewritten;
 *   - by a background sweep of the header and last word of every page, paced
 *     to cover the whole working set about once per second.
 * A bad page is counted once: after reporting it, the workload rewrites it
 * with its expected content.
 *
 * Console lines (stdout, one write per line):
 *   mlab-workload: ready wss_mib=<n> rate_mib_s=<x> pattern=<p> pages=<n> page_size=<n>
 *   mlab-workload: t_ms=<ms> seq=<n> dirtied=<n> rate_pps=<n> checked=<n> bad=<n> sweeps=<n>
 *   mlab-workload: BAD page=<i> expected_gen=<g> found_gen=<g> magic_ok=<0|1>
 *   mlab-workload: error <what failed>
 * A progress line comes once per second. At most 10 BAD lines are printed
 * per second; bad= in the progress line counts all of them. A BAD line with
 * magic_ok=1 and found_gen equal to expected_gen means the header is intact
 * but the fill is not.
 *
 * Options for testing on a build host (the guest passes none):
 *   --cmdline=TEXT      parse TEXT instead of /proc/cmdline
 *   --duration-ms=N     exit with status 0 after N ms of dirtying
 *   --zero-page=I       zero page I 500 ms after the ready line
 *   --stale-page=I      roll page I back one generation 500 ms after ready
 *
 * Exit status: 0 after --duration-ms, 1 when memory cannot be set up,
 * 2 for an invalid setting. Without --duration-ms it never exits.
 *
 * Build: gcc -static -O2 -o mlab-workload workload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_MAGIC 0x6d6c61622d706721ULL /* "mlab-pg!" */
#define FILL_STEP 0x9e3779b97f4a7c15ULL

#define NS_PER_MS 1000000LL
#define NS_PER_S 1000000000LL
#define SLICE_NS (10 * NS_PER_MS)
#define REPORT_NS NS_PER_S
#define SWEEP_PERIOD_NS NS_PER_S
/* Maximum time one slice may account for. After the guest was paused (for
 * example during migration downtime) the workload does not try to catch up
 * the missed pages in one burst. */
#define MAX_SLICE_CREDIT_NS (100 * NS_PER_MS)
#define MAX_BAD_LINES_PER_REPORT 10
/* Pages dirtied between clock reads when the rate is unlimited. */
#define UNLIMITED_CHUNK_PAGES 64
#define INJECT_DELAY_NS (500 * NS_PER_MS)

#define MAX_WSS_MIB 1048576L
#define MAX_RATE_MIB_S 1048576.0
#define CMDLINE_MAX 8192

#define EXIT_SETUP_FAILED 1
#define EXIT_INVALID_SETTING 2

struct settings {
	long wss_mib;
	double rate_mib_s;
	int random_pattern;
	long long duration_ms; /* -1: run forever */
	long long zero_page;   /* -1: no injection */
	long long stale_page;  /* -1: no injection */
};

struct workload {
	unsigned char *memory;
	uint64_t *expected_gen;
	uint64_t pages;
	size_t page_size;
	size_t words_per_page;

	uint64_t cursor;       /* next page for the sequential pattern */
	uint64_t rng_state;    /* xorshift64 state for the random pattern */
	uint64_t sweep_cursor; /* next page for the background sweep */

	uint64_t dirtied;
	uint64_t checked;
	uint64_t bad;
	uint64_t sweeps;
	unsigned bad_lines_in_interval;
};

static void print_line(const char *format, ...)
{
	va_list args;

	fputs("mlab-workload: ", stdout);
	va_start(args, format);
	vprintf(format, args);
	va_end(args);
	fputc('\n', stdout);
	fflush(stdout);
}

static long long monotonic_ns(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (long long)now.tv_sec * NS_PER_S + now.tv_nsec;
}

static void sleep_until_ns(long long deadline)
{
	struct timespec until = {
		.tv_sec = deadline / NS_PER_S,
		.tv_nsec = deadline % NS_PER_S,
	};

	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR)
		;
}

/* splitmix64 finalizer: spreads (index, generation) over all 64 bits. */
static uint64_t mix64(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

static uint64_t xorshift64(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*state = x;
	return x;
}

static uint64_t fill_seed(uint64_t index, uint64_t gen)
{
	return mix64(index ^ mix64(gen + FILL_STEP));
}

static uint64_t *page_words(const struct workload *w, uint64_t index)
{
	return (uint64_t *)(w->memory + index * w->page_size);
}

/* Word 0 is PAGE_MAGIC ^ index, word 1 the generation, the rest the fill. */
static void write_page(struct workload *w, uint64_t index, uint64_t gen)
{
	uint64_t *words = page_words(w, index);
	uint64_t value = fill_seed(index, gen);

	words[0] = PAGE_MAGIC ^ index;
	words[1] = gen;
	for (size_t j = 2; j < w->words_per_page; j++) {
		value += FILL_STEP;
		words[j] = value;
	}
}

static uint64_t expected_last_word(const struct workload *w, uint64_t index, uint64_t gen)
{
	return fill_seed(index, gen) + FILL_STEP * (uint64_t)(w->words_per_page - 2);
}

static int page_is_intact(const struct workload *w, uint64_t index, int full)
{
	const uint64_t *words = page_words(w, index);
	uint64_t gen = w->expected_gen[index];

	if (words[0] != (PAGE_MAGIC ^ index) || words[1] != gen)
		return 0;
	if (!full)
		return words[w->words_per_page - 1] == expected_last_word(w, index, gen);

	uint64_t value = fill_seed(index, gen);
	for (size_t j = 2; j < w->words_per_page; j++) {
		value += FILL_STEP;
		if (words[j] != value)
			return 0;
	}
	return 1;
}

/* Check one page, report it if it is bad and restore its expected content,
 * so the same loss is counted once. */
static void verify_page(struct workload *w, uint64_t index, int full)
{
	const uint64_t *words = page_words(w, index);
	uint64_t expected = w->expected_gen[index];

	w->checked++;
	if (page_is_intact(w, index, full))
		return;

	w->bad++;
	if (w->bad_lines_in_interval < MAX_BAD_LINES_PER_REPORT) {
		w->bad_lines_in_interval++;
		print_line("BAD page=%llu expected_gen=%llu found_gen=%llu magic_ok=%d",
			   (unsigned long long)index, (unsigned long long)expected,
			   (unsigned long long)words[1],
			   words[0] == (PAGE_MAGIC ^ index) ? 1 : 0);
	}
	write_page(w, index, expected);
}

static void dirty_one_page(struct workload *w, int random_pattern)
{
	uint64_t index;

	if (random_pattern) {
		index = xorshift64(&w->rng_state) % w->pages;
	} else {
		index = w->cursor;
		w->cursor = (w->cursor + 1) % w->pages;
	}
	verify_page(w, index, 1);
	w->expected_gen[index]++;
	write_page(w, index, w->expected_gen[index]);
	w->dirtied++;
}

static void sweep_pages(struct workload *w, uint64_t count)
{
	for (uint64_t n = 0; n < count; n++) {
		verify_page(w, w->sweep_cursor, 0);
		w->sweep_cursor++;
		if (w->sweep_cursor == w->pages) {
			w->sweep_cursor = 0;
			w->sweeps++;
		}
	}
}

static void fail_setting(const char *format, ...)
{
	va_list args;

	fputs("mlab-workload: error ", stdout);
	va_start(args, format);
	vprintf(format, args);
	va_end(args);
	fputc('\n', stdout);
	fflush(stdout);
	exit(EXIT_INVALID_SETTING);
}

static long long parse_count(const char *name, const char *text, long long min, long long max,
			     const char *unit)
{
	char *end;
	long long value;

	errno = 0;
	value = strtoll(text, &end, 10);
	if (*text == '\0' || *end != '\0' || errno != 0 || value < min || value > max)
		fail_setting("invalid %s value '%s': expected a whole number of %s from %lld to %lld",
			     name, text, unit, min, max);
	return value;
}

static void apply_cmdline_token(struct settings *s, const char *token)
{
	const char *value;

	if (strncmp(token, "mlab.wss=", 9) == 0) {
		s->wss_mib = (long)parse_count("mlab.wss", token + 9, 1, MAX_WSS_MIB, "MiB");
	} else if (strncmp(token, "mlab.rate=", 10) == 0) {
		char *end;
		double rate;

		value = token + 10;
		errno = 0;
		rate = strtod(value, &end);
		/* The range test also rejects NaN, for which every comparison is false. */
		if (*value == '\0' || *end != '\0' || errno != 0 ||
		    !(rate >= 0.0 && rate <= MAX_RATE_MIB_S))
			fail_setting("invalid mlab.rate value '%s': expected MiB/s as a number "
				     "from 0 to %.0f, where 0 means as fast as possible",
				     value, MAX_RATE_MIB_S);
		s->rate_mib_s = rate;
	} else if (strncmp(token, "mlab.pattern=", 13) == 0) {
		value = token + 13;
		if (strcmp(value, "sequential") == 0)
			s->random_pattern = 0;
		else if (strcmp(value, "random") == 0)
			s->random_pattern = 1;
		else
			fail_setting("invalid mlab.pattern value '%s': expected sequential or random",
				     value);
	}
}

/* Apply the mlab.* settings of a kernel command line. Later values of the
 * same key win, as they do for kernel parameters. */
static void parse_cmdline(struct settings *s, const char *cmdline)
{
	char buffer[CMDLINE_MAX];
	char *saveptr = NULL;

	if (strlen(cmdline) >= sizeof(buffer))
		fail_setting("kernel command line is longer than %d bytes", CMDLINE_MAX - 1);
	strcpy(buffer, cmdline);
	for (char *token = strtok_r(buffer, " \t\n", &saveptr); token != NULL;
	     token = strtok_r(NULL, " \t\n", &saveptr))
		apply_cmdline_token(s, token);
}

static void read_proc_cmdline(char *buffer, size_t size)
{
	FILE *file = fopen("/proc/cmdline", "r");
	size_t length;

	if (file == NULL)
		fail_setting("cannot read /proc/cmdline: %s; mount /proc or pass --cmdline=TEXT",
			     strerror(errno));
	length = fread(buffer, 1, size - 1, file);
	buffer[length] = '\0';
	fclose(file);
}

static void parse_options(struct settings *s, int argc, char **argv)
{
	char proc_cmdline[CMDLINE_MAX];
	const char *cmdline = NULL;

	for (int i = 1; i < argc; i++) {
		const char *arg = argv[i];

		if (strncmp(arg, "--cmdline=", 10) == 0)
			cmdline = arg + 10;
		else if (strncmp(arg, "--duration-ms=", 14) == 0)
			s->duration_ms = parse_count("--duration-ms", arg + 14, 1, 1LL << 40, "ms");
		else if (strncmp(arg, "--zero-page=", 12) == 0)
			s->zero_page = parse_count("--zero-page", arg + 12, 0, 1LL << 40, "pages");
		else if (strncmp(arg, "--stale-page=", 13) == 0)
			s->stale_page = parse_count("--stale-page", arg + 13, 0, 1LL << 40, "pages");
		else
			fail_setting("unknown option '%s': expected --cmdline=TEXT, --duration-ms=N, "
				     "--zero-page=I or --stale-page=I", arg);
	}
	if (cmdline == NULL) {
		read_proc_cmdline(proc_cmdline, sizeof(proc_cmdline));
		cmdline = proc_cmdline;
	}
	parse_cmdline(s, cmdline);
}

static void setup_memory(struct workload *w, const struct settings *s)
{
	long page_size = sysconf(_SC_PAGESIZE);
	size_t bytes = (size_t)s->wss_mib * 1048576u;

	if (page_size < 64) {
		print_line("error cannot get the page size (sysconf returned %ld)", page_size);
		exit(EXIT_SETUP_FAILED);
	}
	w->page_size = (size_t)page_size;
	w->words_per_page = w->page_size / sizeof(uint64_t);
	w->pages = bytes / w->page_size;

	w->expected_gen = calloc(w->pages, sizeof(uint64_t));
	w->memory = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (w->expected_gen == NULL || w->memory == MAP_FAILED) {
		print_line("error cannot allocate mlab.wss=%ld MiB: %s; lower mlab.wss or give "
			   "the guest more memory", s->wss_mib, strerror(errno));
		exit(EXIT_SETUP_FAILED);
	}
	/* Locking keeps the working set resident. Without it the pages are still
	 * touched below, and a guest has no swap, so the workload goes on. */
	if (mlock(w->memory, bytes) != 0)
		print_line("warning mlock of %ld MiB failed (%s); pages are touched but not locked",
			   s->wss_mib, strerror(errno));

	for (uint64_t i = 0; i < w->pages; i++) {
		w->expected_gen[i] = 1;
		write_page(w, i, 1);
	}
}

static void check_injection_page(const char *option, long long page, uint64_t pages)
{
	if (page >= 0 && (uint64_t)page >= pages)
		fail_setting("invalid %s value %lld: the working set has %llu pages (0 to %llu)",
			     option, page, (unsigned long long)pages,
			     (unsigned long long)(pages - 1));
}

static void inject_faults(struct workload *w, const struct settings *s)
{
	if (s->zero_page >= 0)
		memset(page_words(w, (uint64_t)s->zero_page), 0, w->page_size);
	if (s->stale_page >= 0) {
		uint64_t index = (uint64_t)s->stale_page;

		write_page(w, index, w->expected_gen[index] - 1);
	}
}

static void print_progress(struct workload *w, long long now, uint64_t seq,
			   uint64_t dirtied_before, long long interval_ns)
{
	uint64_t written = w->dirtied - dirtied_before;
	uint64_t rate_pps = 0;

	if (interval_ns > 0)
		rate_pps = (uint64_t)((double)written * NS_PER_S / (double)interval_ns + 0.5);
	print_line("t_ms=%lld seq=%llu dirtied=%llu rate_pps=%llu checked=%llu bad=%llu sweeps=%llu",
		   now / NS_PER_MS, (unsigned long long)seq, (unsigned long long)w->dirtied,
		   (unsigned long long)rate_pps, (unsigned long long)w->checked,
		   (unsigned long long)w->bad, (unsigned long long)w->sweeps);
	w->bad_lines_in_interval = 0;
}

static void run(struct workload *w, const struct settings *s)
{
	double pages_per_second = s->rate_mib_s * 1048576.0 / (double)w->page_size;
	long long start = monotonic_ns();
	long long last = start;
	long long next_slice = start + SLICE_NS;
	long long last_report = start;
	long long stop = s->duration_ms > 0 ? start + s->duration_ms * NS_PER_MS : -1;
	int injected = 0;
	double dirty_credit = 0.0;
	double sweep_credit = 0.0;
	uint64_t seq = 0;
	uint64_t dirtied_at_report = 0;

	for (;;) {
		long long now = monotonic_ns();
		long long credit_ns = now - last;

		if (credit_ns > MAX_SLICE_CREDIT_NS)
			credit_ns = MAX_SLICE_CREDIT_NS;
		last = now;

		if (!injected && now - start >= INJECT_DELAY_NS) {
			inject_faults(w, s);
			injected = 1;
		}

		if (s->rate_mib_s > 0.0) {
			dirty_credit += pages_per_second * (double)credit_ns / NS_PER_S;
			uint64_t count = (uint64_t)dirty_credit;
			dirty_credit -= (double)count;
			for (uint64_t n = 0; n < count; n++)
				dirty_one_page(w, s->random_pattern);
		} else {
			long long slice_end = now + SLICE_NS;
			do {
				for (int n = 0; n < UNLIMITED_CHUNK_PAGES; n++)
					dirty_one_page(w, s->random_pattern);
			} while (monotonic_ns() < slice_end);
		}

		sweep_credit += (double)w->pages * (double)credit_ns / SWEEP_PERIOD_NS;
		uint64_t sweep_count = (uint64_t)sweep_credit;
		sweep_credit -= (double)sweep_count;
		sweep_pages(w, sweep_count);

		now = monotonic_ns();
		if (now - last_report >= REPORT_NS) {
			seq++;
			print_progress(w, now, seq, dirtied_at_report, now - last_report);
			dirtied_at_report = w->dirtied;
			last_report = now;
		}
		if (stop >= 0 && now >= stop) {
			seq++;
			print_progress(w, now, seq, dirtied_at_report, now - last_report);
			return;
		}

		if (s->rate_mib_s > 0.0) {
			if (next_slice <= now)
				next_slice = now + SLICE_NS;
			sleep_until_ns(next_slice);
			next_slice += SLICE_NS;
		}
	}
}

int main(int argc, char **argv)
{
	struct settings settings = {
		.wss_mib = 64,
		.rate_mib_s = 8.0,
		.random_pattern = 0,
		.duration_ms = -1,
		.zero_page = -1,
		.stale_page = -1,
	};
	struct workload w;

	setvbuf(stdout, NULL, _IOLBF, 0);
	parse_options(&settings, argc, argv);

	memset(&w, 0, sizeof(w));
	w.rng_state = mix64((uint64_t)monotonic_ns()) | 1u;
	print_line("start wss_mib=%ld rate_mib_s=%g pattern=%s", settings.wss_mib,
		   settings.rate_mib_s, settings.random_pattern ? "random" : "sequential");
	setup_memory(&w, &settings);
	check_injection_page("--zero-page", settings.zero_page, w.pages);
	check_injection_page("--stale-page", settings.stale_page, w.pages);

	print_line("ready wss_mib=%ld rate_mib_s=%g pattern=%s pages=%llu page_size=%zu",
		   settings.wss_mib, settings.rate_mib_s,
		   settings.random_pattern ? "random" : "sequential",
		   (unsigned long long)w.pages, w.page_size);
	run(&w, &settings);
	return 0;
}
