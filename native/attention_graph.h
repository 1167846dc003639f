// Attention scores computed where the KV cache lives: for the flash-attention
// capture on a device backend, a small ggml graph on that backend computes
// the observation rows' softmax of Q.K and reduces it over the query heads
// of each KV group and over the rows, so only one score per (KV head, cell)
// comes back to the host instead of the layer's whole K cache.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

struct ggml_tensor;
struct ggml_backend;
struct ggml_backend_device;
struct ggml_gallocr;

// What one flash-attention node gives to score: its queries, keys and mask
// (the node's sources, device tensors), the observation rows (consecutive,
// row0 .. row0 + n_rows - 1 of the ubatch), their weights, and the node's
// scale and softcap.
struct psg_attention_inputs {
    const ggml_tensor * q = nullptr;     // [hd, n_tokens, n_head], f32
    const ggml_tensor * k = nullptr;     // [hd, n_kv, n_head_kv]
    const ggml_tensor * mask = nullptr;  // [n_kv, >= n_tokens], f16
    int64_t row0 = 0, n_rows = 0;
    const float * weights = nullptr;     // n_rows of them
    int64_t n_cells = 0;                 // the first n_cells keys are scored
    float scale = 1.0f, softcap = 0.0f;
    bool reduce_max = true;              // else sum
};

class psg_attention_graph {
public:
    psg_attention_graph() = default;
    psg_attention_graph(const psg_attention_graph &) = delete;
    psg_attention_graph & operator=(const psg_attention_graph &) = delete;
    ~psg_attention_graph();

    // Whether the keys of `k` live in memory the host cannot read directly
    // (a GPU's, a Vulkan device's): where scoring on the device saves a copy.
    static bool keys_off_host(const ggml_tensor * k);

    // out[g * n_cells + c]: weight * probability of key c, the max or sum
    // over the rows and the query heads of KV group g. Returns false (and
    // says why in `why`) where the backend cannot run the graph; the caller
    // then scores on the host. n_threads: for a CPU backend.
    bool score(const psg_attention_inputs & in, int32_t n_threads, std::vector<float> & out, std::string & why);

private:
    struct runner {
        ggml_backend_device * dev = nullptr;
        ggml_backend * backend = nullptr;
        ggml_gallocr * alloc = nullptr;
    };
    runner * runner_for(const ggml_tensor * k, int32_t n_threads);
    std::vector<runner> runners;   // one per device seen
    std::vector<uint8_t> meta;     // the graph's tensor headers
};
