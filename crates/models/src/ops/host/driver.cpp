// Runs one kernel of kernels.cu on the host (see emulate.hpp), for the tests.
//
//   driver JOB
//
// JOB is a text file of whitespace-separated words: the kernel's name, grid and block sizes, then
// one entry per kernel parameter in order: `u64 N`, `f64 V`, `i32 N`, `in FILE BYTES` (a buffer
// read from FILE) or `out FILE BYTES` (a zeroed buffer written to FILE after the run).
#include "emulate.hpp"
#include "../kernels.cu"

#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <tuple>

namespace {

struct Buffer {
    std::vector<unsigned char> bytes;
    std::string path;
    bool output;
};

struct Job {
    std::ifstream words;
    std::vector<Buffer>* buffers;
    void fail(const std::string& why) {
        std::fprintf(stderr, "driver: %s\n", why.c_str());
        std::exit(2);
    }
    std::string word() {
        std::string w;
        if (!(words >> w)) fail("job ends early");
        return w;
    }
    void expect(const char* kind) {
        const std::string w = word();
        if (w != kind) fail("expected " + std::string(kind) + ", found " + w);
    }
    void* buffer() {
        const std::string kind = word();
        if (kind != "in" && kind != "out") fail("expected in or out, found " + kind);
        Buffer b{{}, word(), kind == "out"};
        b.bytes.resize(std::stoull(word()));
        if (!b.output) {
            std::ifstream f(b.path, std::ios::binary);
            if (!f.read(reinterpret_cast<char*>(b.bytes.data()), b.bytes.size())) fail("cannot read " + b.path);
        }
        buffers->push_back(std::move(b));
        return buffers->back().bytes.data();
    }
    template <typename A> A next() {
        if constexpr (std::is_pointer_v<A>) {
            return static_cast<A>(buffer());
        } else if constexpr (std::is_same_v<A, u64>) {
            expect("u64");
            return std::stoull(word());
        } else if constexpr (std::is_same_v<A, double>) {
            expect("f64");
            return std::stod(word());
        } else {
            static_assert(std::is_same_v<A, int>);
            expect("i32");
            return std::stoi(word());
        }
    }
};

using Invoker = std::function<void(Job&, unsigned, unsigned)>;

template <typename... A> Invoker invoker(void (*kernel)(A...)) {
    return [kernel](Job& job, unsigned grid, unsigned block) {
        // Braced initialisation reads the parameters left to right.
        std::tuple<A...> args{job.next<A>()...};
        l2s_launch(grid, block, [&] { std::apply(kernel, args); });
    };
}

}  // namespace

#define L2S_ENTRY(NAME)                                                                            \
    {#NAME "_f32", invoker(NAME##_f32)}, {#NAME "_f64", invoker(NAME##_f64)},                      \
        {#NAME "_bf16", invoker(NAME##_bf16)}, {#NAME "_f16", invoker(NAME##_f16)}

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: driver JOB\n");
        return 2;
    }
    // Buffers are reserved up front so that pointers handed to the kernel stay valid.
    std::vector<Buffer> buffers;
    buffers.reserve(64);
    Job job{std::ifstream(argv[1]), &buffers};
    if (!job.words) job.fail(std::string("cannot open ") + argv[1]);
    const std::map<std::string, Invoker> kernels = {
        L2S_ENTRY(normalise_forward), L2S_ENTRY(normalise_backward_input),
        L2S_ENTRY(normalise_backward_affine), L2S_ENTRY(softmax_forward),
        L2S_ENTRY(softmax_backward)};
    const std::string name = job.word();
    const auto found = kernels.find(name);
    if (found == kernels.end()) job.fail("no kernel " + name);
    const unsigned grid = std::stoul(job.word()), block = std::stoul(job.word());
    found->second(job, grid, block);
    for (const Buffer& b : buffers) {
        if (!b.output) continue;
        std::ofstream f(b.path, std::ios::binary);
        if (!f.write(reinterpret_cast<const char*>(b.bytes.data()), b.bytes.size())) job.fail("cannot write " + b.path);
    }
    return 0;
}
