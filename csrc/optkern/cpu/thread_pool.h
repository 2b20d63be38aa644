// A tiny fork-join thread pool for the CPU kernels.  Workers spin briefly after a job (so back-to-back
// steps do not pay a wake-up) and then sleep, so they never keep a core busy between training steps.
#pragma once

#include <functional>

namespace optkern {

// Run fn(part, num_threads) for every part 0..num_threads-1, spread over up to num_threads threads (the caller
// among them, taking any part a worker has not claimed yet), and wait for all.
void parallel_run(int num_threads, const std::function<void(int, int)>& fn);

int pool_num_threads();        // the configured thread count (default: the CPUs this process may use)
void pool_set_num_threads(int n);

}  // namespace optkern
