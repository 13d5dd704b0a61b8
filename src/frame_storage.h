// LibTorch side of FrameBatch and LatentBlock: the host tensors, and what an
// encoder prepared ahead of the encode. Only engine sources include this.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Event.h>

#include <array>
#include <memory>
#include <vector>

#include "frame.h"

namespace gstvae {

struct FrameBatch::Storage {
  at::Tensor pixels;  // host batches: uint8, capacity x crop.height x crop.width x bytes_per_pixel
  // Device batches: per frame, its cropped R, G and B planes as uint8
  // crop.height x crop.width views (row stride = the frame's pitch) on the
  // frame's device, in place or in a copy (DeviceFrame::foreign_context);
  // what keeps each frame's memory valid; and the event recorded on the
  // stream of the last kernel that read them (prepare_pixels), which
  // release_frames() waits for before letting the frames go.
  std::vector<std::array<at::Tensor, 3>> frames;
  std::vector<std::shared_ptr<const void>> keep;
  std::unique_ptr<c10::Event> frames_read;
  // Set by Encoder::prepare: the encoder's input (N x 3 x H x W, compute dtype,
  // on the compute device) and, on GPUs, the event that marks the end of its
  // upload on a side stream. Dropped by clear() and add().
  at::Tensor prepared;
  std::unique_ptr<c10::Event> prepared_ready;

  void forget_prepared() {
    prepared = at::Tensor();
    prepared_ready.reset();
  }
  // Waits for the kernels reading the device frames, then drops them. Never throws.
  void release_frames() noexcept;
  // After a kernel reading `frames` was queued on the current stream of `device`.
  void mark_frames_read(const c10::Device& device);
};

struct LatentBlock::Storage {
  at::Tensor values;  // float32, 1-D, page-locked on GPUs
  // Set when the copy into `values` may still be in flight on the device
  // (GSTVAE_DOWNLOAD_OVERLAP): the event recorded after it.
  std::unique_ptr<c10::Event> ready;
};

// After an asynchronous device->host copy on `device`'s current stream: waits
// for it now (block null), or records an event in `block` for
// LatentBlock::wait_ready.
void finish_download(const c10::Device& device, LatentBlock* block);

}  // namespace gstvae
