// Request counter for the benchmark's floor (scripts/bench.sh builds libfuse's
// example/passthrough_hp.cc with this included): encfsd reports its FUSE requests through
// `encfsd status`, and the floor has no such report, so every operation passthrough_hp registers
// is wrapped to count one request (one per FORGET or BATCH_FORGET, however many nodes it names)
// before running unchanged. SIGUSR1 makes a thread write the count so far to the file named by
// BENCH_REQUEST_COUNT_FILE (written beside it, then renamed into place: a reader never sees a
// partial number). Not project code: a measuring tool, applied to a copy of the example.
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

static std::atomic<unsigned long long> bench_requests{0};

template <auto F> struct BenchCounted;
template <typename... A, void (*F)(A...)> struct BenchCounted<F> {
    static void call(A... a) {
        bench_requests.fetch_add(1, std::memory_order_relaxed);
        F(a...);
    }
};

// Called in main before libfuse starts its workers, so they inherit the blocked signal and only
// the reporting thread takes it.
static void bench_start_reporter() {
    const char *path = getenv("BENCH_REQUEST_COUNT_FILE");
    if (path == nullptr)
        return;
    static sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    std::string target(path);
    std::thread([target] {
        for (;;) {
            int sig = 0;
            if (sigwait(&set, &sig) != 0)
                continue;
            std::string partial = target + ".partial";
            FILE *out = fopen(partial.c_str(), "w");
            if (out == nullptr)
                continue;
            fprintf(out, "%llu\n", bench_requests.load(std::memory_order_relaxed));
            if (fclose(out) == 0)
                rename(partial.c_str(), target.c_str());
        }
    }).detach();
}
