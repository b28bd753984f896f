/* A thread that watches one 16-bit word in memory, as a polling virtio driver watches the
 * used ring's idx, and counts every time it reads 0 there. Built at test time by
 * test_strato_ring_publish.py (gcc -shared) and driven through ctypes. */
#include <pthread.h>
#include <stdint.h>

static volatile uint16_t *word;
static volatile int stop, running;
static volatile long zeros, changes;

static void *watch(void *arg)
{
	(void)arg;
	uint16_t old = *word;
	running = 1;
	while (!stop) {
		uint16_t v = *word;
		if (v != old) {
			changes++;
			if (v == 0)
				zeros++;
			old = v;
		}
	}
	return 0;
}

static pthread_t thread;

int watch_start(void *addr)
{
	word = addr;
	stop = running = 0;
	zeros = changes = 0;
	return pthread_create(&thread, 0, watch, 0);
}

int watch_running(void)
{
	return running;
}

long watch_changes(void)
{
	return changes;
}

long watch_zeros(void)
{
	return zeros;
}

void watch_stop(void)
{
	stop = 1;
	pthread_join(thread, 0);
}
