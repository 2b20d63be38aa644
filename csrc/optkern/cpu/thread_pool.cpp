// Fork-join thread pool: persistent workers, a generation counter, a short spin, then a condition variable.
#include "thread_pool.h"

#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define OK_PAUSE() _mm_pause()
#else
#define OK_PAUSE() ((void)0)
#endif

namespace optkern {
namespace {

int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

class Pool {
 public:
  explicit Pool(int workers) {
    // Each worker starts from the generation current at construction: a job posted before the thread is
    // scheduled must still count as new for it.
    const uint64_t start = generation_.load(std::memory_order_acquire);
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i, start] { worker(i + 1, start); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int workers() const { return static_cast<int>(threads_.size()); }

  void run(int nthreads, const std::function<void(int, int)>& fn) {
    std::lock_guard<std::mutex> serialize(run_mu_);  // one parallel job at a time
    job_ = &fn;
    job_threads_ = nthreads;
    pending_.store(nthreads - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    fn(0, nthreads);
    while (pending_.load(std::memory_order_acquire) != 0) OK_PAUSE();
    job_ = nullptr;
  }

 private:
  void worker(int index, uint64_t seen) {
    for (;;) {
      // Spin for a short while: consecutive steps then start without a wake-up.
      auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        OK_PAUSE();
        if (++spins % 256 == 0 &&
            std::chrono::steady_clock::now() - start > std::chrono::microseconds(200)) {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          break;
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_) return;
      const std::function<void(int, int)>* job = job_;
      int n = job_threads_;
      if (job && index < n) {
        (*job)(index, n);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int, int)>* volatile job_ = nullptr;
  volatile int job_threads_ = 0;
  std::atomic<bool> stop_{false};
};

std::mutex g_config_mu;
int g_num_threads = 0;  // 0: not yet initialised
std::unique_ptr<Pool> g_pool;

Pool& pool_for(int nthreads) {
  // Called with g_config_mu held.
  if (!g_pool || g_pool->workers() < nthreads - 1) g_pool = std::make_unique<Pool>(nthreads - 1);
  return *g_pool;
}

}  // namespace

int pool_num_threads() {
  std::lock_guard<std::mutex> lk(g_config_mu);
  if (g_num_threads == 0) g_num_threads = default_threads();
  return g_num_threads;
}

void pool_set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads: expected an integer >= 1, got " + std::to_string(n));
  std::lock_guard<std::mutex> lk(g_config_mu);
  g_num_threads = n;
}

void parallel_run(int nthreads, const std::function<void(int, int)>& fn) {
  if (nthreads <= 1) {
    fn(0, 1);
    return;
  }
  Pool* pool;
  {
    std::lock_guard<std::mutex> lk(g_config_mu);
    pool = &pool_for(nthreads);
  }
  pool->run(nthreads, fn);
}

}  // namespace optkern
