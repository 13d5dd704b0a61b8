// LibTorch side of FrameBatch: the staging tensor. Only engine sources include this.
#pragma once

#include <ATen/ATen.h>

#include "frame.h"

namespace gstvae {

struct FrameBatch::Storage {
  at::Tensor pixels;  // uint8, capacity x crop.height x crop.width x bytes_per_pixel
};

}  // namespace gstvae
