/* Benchmarks: BENCH-START / BENCH-END lines around each workload. */
#include "guest.h"

void run_bench(struct bench_cfg *b)
{
	if (faults_bench(b)) /* blk-flushstorm, serial-flood (faults.c) */
		return;
	if (str_starts(b->name, "blk-"))
		blk_bench(b);
	else if (str_starts(b->name, "net-"))
		net_bench(b);
	else if (exits_bench(b))
		return;
	else
		test_result("bench", false, "unknown benchmark %s (blk-randread, blk-randwrite, "
					    "blk-seqread, blk-seqwrite, net-tx, net-rx, pio-exits, "
					    "mmio-exits, idle)",
			    b->name);
}
