#include "attention_rows.h"

#include <algorithm>
#include <cmath>

bool psg_attention_row(const float * q, const float * kt, int64_t hd, int64_t n, float scale, float softcap,
                       const float * mask, float * probs) {
    // ggml divides the scale by the softcap and multiplies tanh by it
    const float s = softcap != 0.0f ? scale / softcap : scale;
    std::fill(probs, probs + n, 0.0f);
    for (int64_t d = 0; d < hd; ++d) {
        const float   qd = q[d] * s;
        const float * kd = kt + d * n;
        for (int64_t c = 0; c < n; ++c) {
            probs[c] += qd * kd[c];
        }
    }
    float mx = -INFINITY;
    for (int64_t c = 0; c < n; ++c) {
        float v = probs[c];
        if (softcap != 0.0f) {
            v = softcap * std::tanh(v);
        }
        v += mask[c];  // -inf stays -inf
        probs[c] = v;
        mx = std::max(mx, v);
    }
    if (mx == -INFINITY) {
        std::fill(probs, probs + n, 0.0f);
        return false;
    }
    double sum = 0.0;
    for (int64_t c = 0; c < n; ++c) {
        probs[c] = std::exp(probs[c] - mx);  // exp(-inf) = 0
        sum += probs[c];
    }
    const float inv = (float) (1.0 / sum);
    for (int64_t c = 0; c < n; ++c) {
        probs[c] *= inv;
    }
    return true;
}
