// syncbatch with its LibTorch device layer: the core plus DeviceSync and TorchBackend.
// Only c10 headers come with it; your model code includes what it needs from LibTorch.
#pragma once

#include "syncbatch/syncbatch.hpp"
#include "syncbatch/torch/device_sync.hpp"
