#include "heads.h"

#include "state_blob.h"

#include "ggml.h"
#include "llama.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>

using std::invalid_argument;
using std::string;
using std::to_string;
using std::vector;

namespace {

struct writer {
    vector<uint8_t> & out;
    template <typename T> void put(T v) {
        const size_t at = out.size();
        out.resize(at + sizeof(T));
        memcpy(out.data() + at, &v, sizeof(T));
    }
};

// A row of n_head_kv equal head slices, each a whole number of blocks.
uint64_t head_slice_bytes(const psg_state_tensor & b, int32_t n_head_kv, const char * what, int32_t il) {
    const ggml_type t = (ggml_type) b.type;
    const uint64_t ts = ggml_type_size(t), bs = (uint64_t) ggml_blck_size(t);
    const uint64_t n_el = b.row_bytes / ts * bs;
    if (b.row_bytes == 0 || b.row_bytes % ts != 0 || ggml_row_size(t, (int64_t) n_el) != b.row_bytes) {
        throw invalid_argument("KV state: " + string(what) + " row of layer " + to_string(il) + " has " +
                               to_string(b.row_bytes) + " bytes, not a whole number of " + ggml_type_name(t) +
                               " blocks");
    }
    if (n_el % (uint64_t) n_head_kv != 0 || (n_el / n_head_kv) % bs != 0) {
        throw invalid_argument("KV state: " + string(what) + " of layer " + to_string(il) + " (" + to_string(n_el) +
                               " " + ggml_type_name(t) + " values) does not split into " + to_string(n_head_kv) +
                               " heads on block boundaries");
    }
    return b.row_bytes / (uint64_t) n_head_kv;
}

} // namespace

void psg_heads_check_model(const llama_model * m) {
    if (llama_model_is_recurrent(m) || llama_model_is_hybrid(m)) {
        throw invalid_argument("per-head KV eviction needs a plain attention KV cache; this model is recurrent or "
                               "hybrid");
    }
    if (llama_model_n_swa(m) > 0) {
        throw invalid_argument("per-head KV eviction does not support sliding-window attention models");
    }
    const llama_rope_type rope = llama_model_rope_type(m);
    if (rope == LLAMA_ROPE_TYPE_MROPE || rope == LLAMA_ROPE_TYPE_IMROPE || rope == LLAMA_ROPE_TYPE_VISION) {
        throw invalid_argument("per-head KV eviction does not support M-RoPE models (their cells carry 2D positions)");
    }
}

void psg_keep_check_shape(const psg_keep & keep, const psg_state_shape & shape) {
    const size_t L = (size_t) shape.n_layer, G = (size_t) shape.n_head_kv;
    if (keep.n_layer != L || keep.n_head_kv != G || keep.n_keep == 0) {
        throw invalid_argument("keep must have shape [n_layer=" + to_string(L) + ", n_head_kv=" + to_string(G) +
                               ", C >= 1], not [" + to_string(keep.n_layer) + ", " + to_string(keep.n_head_kv) +
                               ", " + to_string(keep.n_keep) + "]");
    }
    if (keep.n_keep > (size_t) INT32_MAX || keep.pos.size() != L * G * keep.n_keep) {
        throw invalid_argument("keep holds " + to_string(keep.pos.size()) + " positions, not n_layer * n_head_kv * C");
    }
}

vector<uint8_t> psg_rewrite_state(const vector<uint8_t> & blob, const psg_state_shape & shape, const psg_keep & keep,
                                  const vector<int32_t> & cell_pos, int32_t seq_out) {
    const int32_t L = shape.n_layer, G = shape.n_head_kv;
    if (L < 1 || G < 1) {
        throw invalid_argument("KV state: the model has no layers or KV heads");
    }
    psg_keep_check_shape(keep, shape);
    const int32_t C = (int32_t) keep.n_keep;
    if (cell_pos.size() != (size_t) C) {
        throw invalid_argument("cell positions: " + to_string(cell_pos.size()) + " given for " + to_string(C) +
                               " kept entries per head");
    }
    for (int32_t i = 0; i < C; ++i) {
        if (cell_pos[i] < 0 || (i > 0 && cell_pos[i] <= cell_pos[i - 1])) {
            throw invalid_argument("cell positions must be >= 0 and strictly increasing");
        }
    }

    // ---- parse (everything checked before anything is written)
    psg_state_blob st = psg_state_read_cells(blob);
    const uint32_t n_cells = (uint32_t) st.cell_pos.size();
    if (n_cells == 0) {
        throw invalid_argument("KV state holds no cells");
    }
    std::unordered_map<int32_t, int32_t> cell_of; // position -> cell index in the blob
    cell_of.reserve(n_cells);
    for (uint32_t i = 0; i < n_cells; ++i) {
        if (!cell_of.emplace(st.cell_pos[i], (int32_t) i).second) {
            throw invalid_argument("KV state holds position " + to_string(st.cell_pos[i]) + " twice");
        }
    }
    psg_state_read_layers(blob, st, L);
    const uint32_t v_trans = st.v_trans;
    const vector<psg_state_tensor> & k = st.k;
    const vector<psg_state_tensor> & v = st.v;
    // every row must split into G head slices
    vector<uint64_t> k_slice(L), v_slice(L);
    for (int32_t il = 0; il < L; ++il) {
        k_slice[il] = head_slice_bytes(k[il], G, "K", il);
    }
    for (int32_t il = 0; il < L; ++il) {
        if (!v_trans) {
            v_slice[il] = head_slice_bytes(v[il], G, "V", il);
        } else if (v[il].n_embd % (uint32_t) G != 0) {
            throw invalid_argument("KV state: V of layer " + to_string(il) + " has " + to_string(v[il].n_embd) +
                                   " rows, not a multiple of " + to_string(G) + " heads");
        }
    }

    // ---- map kept positions to blob cells; each head's list must be distinct
    vector<int32_t> src(keep.pos.size());
    vector<int32_t> seen(n_cells, -1);
    for (int32_t lh = 0; lh < L * G; ++lh) {
        for (int32_t i = 0; i < C; ++i) {
            const int32_t p = keep.pos[(size_t) lh * C + i];
            auto it = cell_of.find(p);
            if (it == cell_of.end()) {
                throw invalid_argument("kept position " + to_string(p) + " (layer " + to_string(lh / G) + ", KV head " +
                                       to_string(lh % G) + ") is not in the sequence");
            }
            if (seen[it->second] == lh) {
                throw invalid_argument("layer " + to_string(lh / G) + ", KV head " + to_string(lh % G) +
                                       " keeps position " + to_string(p) + " twice");
            }
            seen[it->second] = lh;
            src[(size_t) lh * C + i] = it->second;
        }
    }

    // ---- write
    vector<uint8_t> out;
    size_t size = 16 + (size_t) C * 12 + 8;
    for (int32_t il = 0; il < L; ++il) {
        size += 12 + k[il].row_bytes * C;
        size += v_trans ? 12 + (size_t) v[il].n_embd * C * v[il].el_bytes : 12 + v[il].row_bytes * C;
    }
    out.reserve(size);
    writer w{out};
    w.put<uint32_t>(PSG_STATE_SEQ_MAGIC);
    w.put<int32_t>(seq_out);
    w.put<uint32_t>(1);
    w.put<uint32_t>((uint32_t) C);
    for (int32_t i = 0; i < C; ++i) {
        w.put<int32_t>(cell_pos[i]);
        w.put<uint32_t>(1);
        w.put<int32_t>(seq_out);
    }
    w.put<uint32_t>(v_trans);
    w.put<uint32_t>((uint32_t) L);

    auto put_rows = [&](const psg_state_tensor & b, uint64_t slice, int32_t il) {
        w.put<int32_t>(b.type);
        w.put<uint64_t>(b.row_bytes);
        const size_t at = out.size();
        out.resize(at + b.row_bytes * C);
        uint8_t * dst = out.data() + at;
        for (int32_t i = 0; i < C; ++i) {
            for (int32_t h = 0; h < G; ++h) {
                const int32_t cell = src[((size_t) il * G + h) * C + i];
                memcpy(dst + i * b.row_bytes + h * slice, blob.data() + b.data + cell * b.row_bytes + h * slice, slice);
            }
        }
    };
    for (int32_t il = 0; il < L; ++il) {
        put_rows(k[il], k_slice[il], il);
    }
    for (int32_t il = 0; il < L; ++il) {
        const psg_state_tensor & b = v[il];
        if (!v_trans) {
            put_rows(b, v_slice[il], il);
            continue;
        }
        // Vᵀ: n_embd rows of one element per cell; head h owns a block of rows
        w.put<int32_t>(b.type);
        w.put<uint32_t>(b.el_bytes);
        w.put<uint32_t>(b.n_embd);
        const uint32_t rows_per_head = b.n_embd / (uint32_t) G;
        const size_t at = out.size();
        out.resize(at + (size_t) b.n_embd * C * b.el_bytes);
        uint8_t * dst = out.data() + at;
        const uint8_t * base = blob.data() + b.data;
        for (uint32_t j = 0; j < b.n_embd; ++j) {
            const int32_t * cells = src.data() + ((size_t) il * G + j / rows_per_head) * C;
            const uint8_t * row = base + (size_t) j * n_cells * b.el_bytes;
            uint8_t * out_row = dst + (size_t) j * C * b.el_bytes;
            for (int32_t i = 0; i < C; ++i) {
                memcpy(out_row + (size_t) i * b.el_bytes, row + (size_t) cells[i] * b.el_bytes, b.el_bytes);
            }
        }
    }
    return out;
}
