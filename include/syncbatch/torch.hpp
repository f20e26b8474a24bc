// syncbatch with its LibTorch layer: the core plus DeviceSync, TorchBackend and stacked mode for
// tensor models. It brings c10 headers and ATen/core/Tensor.h, not torch/torch.h.
#pragma once

#include "syncbatch/syncbatch.hpp"
#include "syncbatch/torch/device_sync.hpp"
#include "syncbatch/torch/stacked.hpp"
