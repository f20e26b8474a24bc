// The torch-free core of syncbatch: policies, SyncScope, BatchedSubmitter, Future, stats.
// For the LibTorch device layer (DeviceSync, TorchBackend) include "syncbatch/torch.hpp".
#pragma once

#include "syncbatch/batched_submitter.hpp"
#include "syncbatch/error.hpp"
#include "syncbatch/future.hpp"
#include "syncbatch/multi_device.hpp"
#include "syncbatch/stats.hpp"
#include "syncbatch/sync_policy.hpp"
#include "syncbatch/sync_scope.hpp"
#include "syncbatch/version.hpp"
