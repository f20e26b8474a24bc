// syncbatch with its LibTorch layer: the core plus DeviceSync, TorchBackend, stacked mode for
// tensor models, GraphedModel (CUDA graph replay) and TorchScriptModel. It brings c10 headers and
// ATen/core/Tensor.h, not torch/torch.h.
#pragma once

#include "syncbatch/syncbatch.hpp"
#include "syncbatch/torch/device_sync.hpp"
#include "syncbatch/torch/graphs.hpp"
#include "syncbatch/torch/stacked.hpp"
#include "syncbatch/torch/torchscript.hpp"
