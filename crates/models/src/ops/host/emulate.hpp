// The part of CUDA's execution model that kernels.cu uses, on the host: a block is that many
// std::threads meeting at a std::barrier for __syncthreads(), __shared__ variables are statics
// (one copy, seen by every thread of the block), and blocks run one after another. Enough to run
// the kernels' indexing, arithmetic and reductions exactly as written, on machines without a GPU.
#pragma once
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct l2s_dim3 {
    unsigned x;
};
inline thread_local l2s_dim3 threadIdx{0};
inline thread_local l2s_dim3 blockIdx{0};
inline l2s_dim3 blockDim{1};
inline std::barrier<>* l2s_block_barrier = nullptr;

#define __global__
#define __device__
#define __shared__ static

inline void __syncthreads() { l2s_block_barrier->arrive_and_wait(); }
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
using std::exp;
using std::sqrt;

// Runs `body` as `grid` blocks of `block` threads.
inline void l2s_launch(unsigned grid, unsigned block, const std::function<void()>& body) {
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> barrier(block);
        l2s_block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&, t] {
                threadIdx.x = t;
                blockIdx.x = b;
                body();
            });
        }
        for (auto& thread : threads) {
            thread.join();
        }
    }
}
