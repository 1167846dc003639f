// One attention row computed on the host: what the flash-attention capture
// needs, since llama.cpp's flash attention never materialises the softmax.
#pragma once

#include <cstdint>

// probs[c] = softmax over c of (softcap(scale * q . k_c) + mask[c]) for one
// query head q[hd] against n keys stored transposed, kt[d * n + c] (so the
// inner loop runs over contiguous keys and vectorises without reassociating
// a sum). softcap = 0 means none; mask[c] = -inf hides key c. A row that
// sees no key is all zeros; returns false then.
bool psg_attention_row(const float * q, const float * kt, int64_t hd, int64_t n, float scale, float softcap,
                       const float * mask, float * probs);
