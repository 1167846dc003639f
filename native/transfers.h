// Copies between llama.cpp's buffers and the host, counted for the whole
// process: on a GPU build with the KV cache offloaded each one crosses the
// bus (and is a queue submit), on the CPU build it is a memory copy. A
// request's figures are the difference of two readings.
#pragma once

#include <cstddef>
#include <cstdint>

enum psg_transfer_kind {
    PSG_STATE_READ = 0,  // a sequence's KV state read whole (llama_state_seq_get_data)
    PSG_STATE_WRITE,     // a KV state written back (llama_state_seq_set_data)
    PSG_CAPTURE_READ,    // attention rows, a layer's keys, or reduced scores, read by the capture
    PSG_CAPTURE_WRITE,   // row weights the capture's graph on the device reads
    PSG_TRANSFER_KINDS,
};

struct psg_transfer_count {
    uint64_t calls = 0;
    uint64_t bytes = 0;
};

void psg_count_transfer(psg_transfer_kind kind, size_t bytes);
psg_transfer_count psg_transfers(psg_transfer_kind kind);
