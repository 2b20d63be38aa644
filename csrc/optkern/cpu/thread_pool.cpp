// Fork-join thread pool: persistent workers that spin briefly, then sleep on a condition variable.
//
// A job's parts (thread indices 0..n-1) are claimed from one atomic ticket (job number, n, next index) by whichever
// thread gets there first, the caller included: when a worker is slow to wake (its core taken by another library's
// spinning threads, e.g. torch's OpenMP pool right after a torch op), the caller runs that part itself instead of
// waiting for it.  Which thread runs a part never changes what it computes (each part writes its own outputs and
// partial sums, combined in index order), so results stay bitwise identical.  The caller returns once every part
// has ended; an exception from a part is rethrown there.  One job runs at a time (a global lock, also held while the pool is
// resized), and a forked child starts with no pool.
#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
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

constexpr int kMaxThreads = 1024;

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
    try {
      for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { worker(i + 1); });
    } catch (...) {
      shutdown();  // join what started, then report the failure
      throw;
    }
  }
  ~Pool() { shutdown(); }
  int workers() const { return static_cast<int>(threads_.size()); }

  // Callers hold the global run lock.
  void run(int nthreads, const std::function<void(int, int)>& fn) {
    job_.store(&fn, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    const uint64_t job = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
    // The job's function is published before its ticket; a part is claimed only from the current ticket.
    ticket_.store((job << 32) | (static_cast<uint64_t>(nthreads) << 16), std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    drain();
    int spins = 0;  // parts other threads claimed and still run
    while (done_.load(std::memory_order_acquire) != nthreads)
      if (++spins % 256 == 0) std::this_thread::yield(); else OK_PAUSE();
    if (error_) std::rethrow_exception(error_);  // the first part that threw (no kernel does today)
  }

 private:
  // Claim and run parts of the current job until none is left.  The caller of run() returns only when every part
  // is done (done_), and a newer job is published only after that, so a successful compare-and-swap on the ticket
  // proves that the function read after loading it is this job's and stays alive until the part ends.  A thread
  // that read the ticket and then stalled (preempted) holds nobody up: its compare-and-swap fails later.
  void drain() {
    for (;;) {
      uint64_t t = ticket_.load(std::memory_order_acquire);
      const int n = static_cast<int>((t >> 16) & 0xffff), idx = static_cast<int>(t & 0xffff);
      if (idx >= n) return;
      const std::function<void(int, int)>* job = job_.load(std::memory_order_relaxed);
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        try {
          (*job)(idx, n);
        } catch (...) {
          std::lock_guard<std::mutex> lk(error_mu_);
          if (!error_) error_ = std::current_exception();
        }
        done_.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  }

  void shutdown() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true, std::memory_order_release);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    threads_.clear();
  }

  void worker(int) {
    uint64_t seen = 0;  // the generation at construction: no job has been posted yet
    for (;;) {
      // Spin for a short while: consecutive steps then start without a wake-up.  The spin yields every few
      // microseconds, so a worker sharing a core with the caller's thread (an oversubscribed or busy machine)
      // lets it run its serial part instead of burning the time slice.
      auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        OK_PAUSE();
        if (++spins % 256 == 0) std::this_thread::yield();
        if (spins % 256 == 0 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(200)) {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          break;
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      drain();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};                       // bumped per job (and at shutdown): wakes workers
  std::atomic<uint64_t> ticket_{0};                           // job number << 32 | parts << 16 | next part
  std::atomic<int> done_{0};                                  // parts of the current job that have ended
  std::mutex error_mu_;
  std::exception_ptr error_;                                  // the first exception a part threw
  std::atomic<const std::function<void(int, int)>*> job_{nullptr};
  std::atomic<bool> stop_{false};
};

// Heap-allocated so that a forked child can abandon them (the parent's threads do not exist there).
std::mutex* g_run_mu = new std::mutex;  // one parallel job at a time; guards g_pool
Pool* g_pool = nullptr;
std::atomic<int> g_num_threads{0};  // 0: not yet initialised

void after_fork_in_child() {
  g_run_mu = new std::mutex;  // the old one may have been held by a thread that does not exist here
  g_pool = nullptr;           // leaked on purpose: its threads are gone, joining them would hang
}
const int g_atfork_registered = pthread_atfork(nullptr, nullptr, after_fork_in_child);

}  // namespace

int pool_num_threads() {
  int n = g_num_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    int d = default_threads();
    g_num_threads.compare_exchange_strong(n, d);
    n = g_num_threads.load(std::memory_order_relaxed);
  }
  return n;
}

void pool_set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads)
    throw std::invalid_argument("num_threads: expected an integer in [1, " + std::to_string(kMaxThreads) + "], got " +
                                std::to_string(n));
  g_num_threads.store(n, std::memory_order_relaxed);
}

void parallel_run(int nthreads, const std::function<void(int, int)>& fn) {
  (void)g_atfork_registered;
  if (nthreads <= 1) {
    fn(0, 1);
    return;
  }
  std::lock_guard<std::mutex> lk(*g_run_mu);
  if (!g_pool || g_pool->workers() < nthreads - 1) {
    delete g_pool;  // idle: we hold the run lock
    g_pool = nullptr;
    g_pool = new Pool(nthreads - 1);
  }
  g_pool->run(nthreads, fn);
}

}  // namespace optkern
