// The llama.cpp sampler chain of a context: greedy at temperature 0, else
// top-p, temperature and a seeded draw.
#pragma once

#include "llama.h"

#include <cstdint>

struct psg_sampler {
    llama_sampler * chain = nullptr;

    psg_sampler() = default;
    psg_sampler(const psg_sampler &) = delete;
    psg_sampler & operator=(const psg_sampler &) = delete;
    ~psg_sampler();

    // Checks the settings (std::invalid_argument), then replaces the chain.
    void set(float temperature, float top_p, uint32_t seed);
    // A token drawn from the logits of batch row `i` of the last decode.
    int32_t sample(llama_context * ctx, int32_t i);
    void free();
};
