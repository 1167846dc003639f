#include "sampler.h"

#include <stdexcept>

psg_sampler::~psg_sampler() {
    free();
}

void psg_sampler::free() {
    if (chain != nullptr) {
        llama_sampler_free(chain);
        chain = nullptr;
    }
}

void psg_sampler::set(float temperature, float top_p, uint32_t seed) {
    if (!(top_p > 0.0f && top_p <= 1.0f)) {
        throw std::invalid_argument("top_p must be in (0, 1]");
    }
    if (!(temperature >= 0.0f)) {
        throw std::invalid_argument("temperature must be >= 0");
    }
    free();
    chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (temperature == 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
    } else {
        if (top_p < 1.0f) {
            llama_sampler_chain_add(chain, llama_sampler_init_top_p(top_p, 1));
        }
        llama_sampler_chain_add(chain, llama_sampler_init_temp(temperature));
        llama_sampler_chain_add(chain, llama_sampler_init_dist(seed));
    }
}

int32_t psg_sampler::sample(llama_context * ctx, int32_t i) {
    return llama_sampler_sample(chain, ctx, i);
}
