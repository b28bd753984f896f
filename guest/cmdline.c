/*
 * Command line: space-separated words.
 *   tests=serial,pci,blk,net,rng,console,irq,smp   (default: all that find a device)
 *   bench=NAME[,key=value...]                       (repeatable)
 *   irq=msix|poll  cpus=N  timeout=MS  host-timeout=MS  net-rx=N  bar64=ADDR  verbose=1
 *   fault=pf|ud                                     (raise an exception on purpose)
 *   qd= bs= seconds= ops= size= indirect= region= port= addr=  (defaults for every bench)
 */
#include "guest.h"

struct config cfg;

static struct bench_cfg bench_defaults = {
	.qd = 1, .bs = 4096, .seconds = 2, .ops = 0, .size = 1514, .indirect = 0, .region = 0,
};

static bool bench_param(struct bench_cfg *b, const char *key, const char *val)
{
	u64 v;
	if (!parse_u64(val, &v))
		return false;
	if (!strcmp(key, "qd"))
		b->qd = v;
	else if (!strcmp(key, "bs"))
		b->bs = v;
	else if (!strcmp(key, "seconds"))
		b->seconds = v;
	else if (!strcmp(key, "ops"))
		b->ops = v;
	else if (!strcmp(key, "size"))
		b->size = v;
	else if (!strcmp(key, "indirect"))
		b->indirect = v;
	else if (!strcmp(key, "region"))
		b->region = v;
	else if (!strcmp(key, "port"))
		b->port = v;
	else if (!strcmp(key, "addr"))
		b->addr = v;
	else
		return false;
	return true;
}

/* Split "key=value" in place. */
static char *split_eq(char *word)
{
	for (char *p = word; *p; p++)
		if (*p == '=') {
			*p = 0;
			return p + 1;
		}
	return NULL;
}

static void parse_bench(char *spec)
{
	if (cfg.nbench >= MAX_BENCHES) {
		printf("WARN too many bench= words, ignoring %s\n", spec);
		return;
	}
	struct bench_cfg *b = &cfg.bench[cfg.nbench++];
	*b = bench_defaults;
	b->name[0] = 0;
	char *p = spec;
	bool first = true;
	while (p) {
		char *comma = p;
		while (*comma && *comma != ',')
			comma++;
		char *next = *comma ? comma + 1 : NULL;
		*comma = 0;
		if (first) {
			snprintf(b->name, sizeof(b->name), "%s", p);
			first = false;
		} else {
			char *val = split_eq(p);
			if (!val || !bench_param(b, p, val))
				printf("WARN bad bench parameter %s\n", p);
		}
		p = next;
	}
}

void cmdline_parse(const char *cmdline)
{
	cfg.irq_msix = true;
	cfg.timeout_ms = 5000;
	cfg.host_timeout_ms = 20000;
	cfg.net_rx_frames = 4;
	snprintf(cfg.cmdline, sizeof(cfg.cmdline), "%s", cmdline ? cmdline : "");

	/* Bench defaults given as separate words apply to every bench, wherever they stand. */
	static char copy[1024];
	for (int pass = 0; pass < 2; pass++) {
		snprintf(copy, sizeof(copy), "%s", cfg.cmdline);
		char *p = copy;
		while (*p) {
			while (*p == ' ' || *p == '\t' || *p == '\n')
				p++;
			if (!*p)
				break;
			char *word = p;
			while (*p && *p != ' ' && *p != '\t' && *p != '\n')
				p++;
			if (*p)
				*p++ = 0;
			char *val = split_eq(word);
			if (!val)
				continue; /* words from a boot loader, not ours */
			if (pass == 0) {
				bench_param(&bench_defaults, word, val);
				continue;
			}
			u64 v;
			if (!strcmp(word, "tests")) {
				snprintf(cfg.tests, sizeof(cfg.tests), "%s", val);
				cfg.tests_given = true;
			} else if (!strcmp(word, "bench")) {
				parse_bench(val);
			} else if (!strcmp(word, "irq")) {
				if (!strcmp(val, "poll"))
					cfg.irq_msix = false;
				else if (!strcmp(val, "msix"))
					cfg.irq_msix = true;
				else
					printf("WARN irq=%s: expected msix or poll\n", val);
			} else if (!strcmp(word, "cpus") && parse_u64(val, &v)) {
				cfg.cpus = v;
			} else if (!strcmp(word, "timeout") && parse_u64(val, &v)) {
				cfg.timeout_ms = v;
			} else if (!strcmp(word, "host-timeout") && parse_u64(val, &v)) {
				cfg.host_timeout_ms = v;
			} else if (!strcmp(word, "net-rx") && parse_u64(val, &v)) {
				cfg.net_rx_frames = v;
			} else if (!strcmp(word, "fault")) {
				snprintf(cfg.fault, sizeof(cfg.fault), "%s", val);
			} else if (!strcmp(word, "bar64") && parse_u64(val, &v)) {
				cfg.bar64 = v;
			} else if (!strcmp(word, "verbose") && parse_u64(val, &v)) {
				cfg.verbose = v != 0;
			}
		}
	}
	/* With benchmarks and no tests= the run is benchmarks only. */
	if (cfg.nbench && !cfg.tests_given) {
		cfg.tests_given = true;
		cfg.tests[0] = 0;
	}
}

/* Is `name` listed? "blk" selects "blk-rw", "blk-id", ...; "all" selects everything. */
bool test_explicit(const char *name)
{
	const char *p = cfg.tests;
	while (*p) {
		const char *end = p;
		while (*end && *end != ',')
			end++;
		usize n = (usize)(end - p);
		if (n == 3 && !strncmp(p, "all", 3))
			return true;
		if (n && !strncmp(p, name, n) && (name[n] == 0 || name[n] == '-'))
			return true;
		p = *end ? end + 1 : end;
	}
	return false;
}

bool test_selected(const char *name)
{
	return !cfg.tests_given || test_explicit(name);
}
