/* Benchmarks: BENCH-START / BENCH-END lines around each workload. */
#include "guest.h"

void run_bench(struct bench_cfg *b)
{
	if (str_starts(b->name, "blk-"))
		blk_bench(b);
	else if (str_starts(b->name, "net-"))
		net_bench(b);
	else
		test_result("bench", false, "unknown benchmark %s (blk-randread, blk-randwrite, "
					    "blk-seqread, blk-seqwrite, net-tx, net-rx)",
			    b->name);
}
