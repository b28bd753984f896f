/*
 * Command line: space-separated words.
 *   tests=serial,pci,blk,net,rng,console,irq,smp   (default: all that find a device, but
 *                                                    not those that wait for the host)
 *   tests=power|reboot|highmem                      (only when named)
 *   bench=NAME[,key=value...]                       (repeatable)
 *   irq=msix|poll  cpus=N  timeout=MS  host-timeout=MS  net-rx=N  bar64=ADDR  verbose=1
 *   host=1 (the host answers READY lines)  end=poweroff|reset (how a passing run ends)
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

/* The words this guest reads (other words come from a boot loader or a VMM's default). */
static bool own_word(const char *key)
{
	static const char *const keys[] = {
		"tests", "bench", "irq", "cpus", "timeout", "host-timeout", "net-rx", "fault",
		"bar64", "verbose", "host", "end", "qd", "bs", "seconds", "ops", "size",
		"indirect", "region", "port", "addr",
	};
	for (usize i = 0; i < ARRAY_SIZE(keys); i++)
		if (!strcmp(key, keys[i]))
			return true;
	return false;
}

void cmdline_parse(const char *cmdline)
{
	cfg.irq_msix = true;
	cfg.timeout_ms = 5000;
	cfg.host_timeout_ms = 20000;
	cfg.net_rx_frames = 4;
	snprintf(cfg.cmdline, sizeof(cfg.cmdline), "%s", cmdline ? cmdline : "");
	bool own_words = false, end_given = false;

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
				own_words |= own_word(word);
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
			} else if (!strcmp(word, "end")) {
				end_given = true;
				if (!strcmp(val, "poweroff") || !strcmp(val, "reset"))
					cfg.end_poweroff = !strcmp(val, "poweroff");
				else
					printf("WARN end=%s: expected poweroff or reset\n", val);
			} else if (!strcmp(word, "host") && parse_u64(val, &v)) {
				cfg.host_answers = v != 0;
			} else if (!strcmp(word, "verbose") && parse_u64(val, &v)) {
				cfg.verbose = v != 0;
			}
		}
	}
	/* Run by hand without a word of ours (strato passes its default kernel command line), a
	 * passing run powers off: a VMM that reboots on a reset (strato's default) would otherwise
	 * run the checks again forever. */
	if (!end_given)
		cfg.end_poweroff = !own_words;
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

/* Named itself in tests= (neither "all" nor a family name selects it). */
bool test_named(const char *name)
{
	usize len = strlen(name);
	for (const char *p = cfg.tests; *p;) {
		const char *e = p;
		while (*e && *e != ',')
			e++;
		if ((usize)(e - p) == len && !strncmp(p, name, len))
			return true;
		p = *e ? e + 1 : e;
	}
	return false;
}

bool test_selected(const char *name)
{
	return !cfg.tests_given || test_explicit(name);
}
