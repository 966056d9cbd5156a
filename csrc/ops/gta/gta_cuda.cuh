// Device-side pieces of the CUDA GTA launcher shared with the select family.
#pragma once
#include <vector>

#include "fastmerge/cuda_utils.cuh"
#include "gta_plan.h"

namespace fastmerge {

// Per-expert state the merge kernel reads.
struct GtaExpertDev {
  const void* data;
  int dtype;
  int kind;  // MaskKind
  unsigned long long keep_from, drop_from;
  float keep_prob, weight, scale;
  float mix_weight, divisor_weight;  // consensus: agreeing x enters the sum as x * mix_weight
  const float* prob;  // DELLA keep probabilities (device), else null
};

struct GtaMergeArgs {
  const void* base;
  int base_dtype;  // -1: no base
  void* out;
  int out_dtype;
  int64_t n;
  int experts;
  int consensus;
  bool normalize;
  float lambda, divisor;
  unsigned long long seed;
  unsigned int stream;
};

// A finished plan (boundaries, rescale factors) and the DELLA probabilities it refers to.
struct GtaDevicePlan {
  GtaPlan plan;
  std::vector<DeviceBuffer> della_probs;  // per expert; empty buffers for non-DELLA experts
};

GtaDevicePlan gta_prepare_cuda(const TensorView* base, const std::vector<TensorView>& experts,
                               const GtaParams& params, int64_t n, cudaStream_t stream);

}  // namespace fastmerge
