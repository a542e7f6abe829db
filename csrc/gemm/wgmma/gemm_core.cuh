#pragma once
// The GEMM core: CUTLASS's persistent warp-specialized cooperative kernel for Hopper (TMA loads,
// wgmma, float32 accumulation), unchanged, with two hooks added by wrapping its collectives:
//
//   TaggingEpilogue  after a tile's output is stored, tags it in tile_ready so that peers may read it;
//   WaitingMainloop  before the producer warp loads a band of A rows, waits until it is in band_ready.
//
// The epilogue stores with plain st.global (CUTLASS's non-TMA epilogue), so a tag published with a
// system-scope release after a barrier of the consumer threads covers every byte of the tile.
//
// Nothing in the kernel may call a function (printf, NVSHMEM, a device assert: build with NDEBUG):
// one call makes ptxas serialize every wgmma. So the band wait traps on timeout without a message;
// the comm kernel that fills the bands waits with the same deadline and prints who it waited for.
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <string>

#include "core/check.h"
#include "core/launch.cuh"
#include "core/memory.cuh"
#include "gemm/wgmma/wgmma.h"

namespace symcomm {

template <class Base>
struct TaggingEpilogue : Base {
  struct Arguments {
    typename Base::Arguments base;
    std::uint64_t* tiles;  // null: no tags
    const std::uint64_t* epoch;
  };
  struct Params : Base::Params {
    std::uint64_t* tiles;
    const std::uint64_t* epoch;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& shape, Arguments const& args, void* workspace) {
    return Params{Base::to_underlying_arguments(shape, args.base, workspace), args.tiles, args.epoch};
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const& shape, Arguments const& args) {
    return Base::get_workspace_size(shape, args.base);
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const& shape, Arguments const& args, void* workspace,
                                              cudaStream_t stream, cutlass::CudaHostAdapter* adapter = nullptr) {
    return Base::initialize_workspace(shape, args.base, workspace, stream, adapter);
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& shape, Arguments const& args) {
    return Base::can_implement(shape, args.base);
  }

  CUTLASS_HOST_DEVICE TaggingEpilogue(Params const& params, typename Base::TensorStorage& storage)
      : Base(params, storage), tiles_(params.tiles), epoch_(params.epoch) {}

  template <class ProblemShapeMNKL, class TileShapeMNK, class TileCoordMNKL, class AccEngine, class AccLayout,
            class TiledMma>
  CUTLASS_DEVICE auto store(typename Base::LoadPipeline load_pipeline,
                            typename Base::LoadPipelineState load_state,
                            typename Base::StorePipeline store_pipeline,
                            typename Base::StorePipelineState store_state, ProblemShapeMNKL problem,
                            TileShapeMNK tile, TileCoordMNKL coord, cute::Tensor<AccEngine, AccLayout> accumulators,
                            TiledMma tiled_mma, int thread_idx, typename Base::TensorStorage& storage,
                            int subtile = -1) {
    auto next = Base::store(load_pipeline, load_state, store_pipeline, store_state, problem, tile, coord,
                            accumulators, tiled_mma, thread_idx, storage, subtile);
    if (tiles_ != nullptr) {
      // Every consumer thread has issued its stores; the release below is cumulative over them.
      cutlass::arch::NamedBarrier::sync(cute::size(tiled_mma), kTagBarrier);
      if (thread_idx == 0) {
        const int t = tile_index(cute::get<0>(coord), cute::get<1>(coord), cute::get<3>(coord),
                                 tiles_along(cute::get<0>(problem), kTileM), tiles_along(cute::get<1>(problem), kTileN));
        __threadfence_system();
        store_release_sys(tiles_ + t, load_tag(epoch_));
      }
    }
    return next;
  }

 private:
  static constexpr int kTagBarrier = 0;  // a user id: CUTLASS offsets it past its reserved barriers
  std::uint64_t* tiles_;
  const std::uint64_t* epoch_;
};

template <class Base>
struct WaitingMainloop : Base {
  struct Arguments {
    typename Base::Arguments base;
    const std::uint64_t* bands;  // null: A is complete before the kernel starts
    const std::uint64_t* epoch;
    std::uint64_t timeout_ns;
  };
  struct Params : Base::Params {
    const std::uint64_t* bands;
    const std::uint64_t* epoch;
    std::uint64_t timeout_ns;
    int tiles_m;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& shape, Arguments const& args, void* workspace) {
    const int tiles_m = tiles_along(cute::get<0>(shape), kTileM);
    return Params{Base::to_underlying_arguments(shape, args.base, workspace), args.bands, args.epoch, args.timeout_ns,
                  tiles_m};
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& shape, Arguments const& args) {
    return Base::can_implement(shape, args.base);
  }

  template <class LoadInputs, class BlockCoord, class... Rest>
  CUTLASS_DEVICE void load(Params const& params, typename Base::MainloopPipeline pipeline,
                           typename Base::PipelineState state, LoadInputs const& inputs, BlockCoord const& block,
                           Rest&&... rest) {
    if (params.bands != nullptr) {
      const std::uint64_t* band = params.bands + band_index(cute::get<0>(block), cute::get<3>(block), params.tiles_m);
      const std::uint64_t tag = load_tag(params.epoch), start = global_timer_ns();
      while (load_acquire_sys(band) < tag)
        if (global_timer_ns() - start > params.timeout_ns) __trap();
      // The band was written through the generic proxy (by other SMs); TMA reads through the async one.
      asm volatile("fence.proxy.async.global;" ::: "memory");
    }
    Base::load(params, pipeline, state, inputs, block, static_cast<Rest&&>(rest)...);
  }
};

template <class T, bool BKMajor>
struct FusedGemm {
  using TileShape = cute::Shape<cute::Int<kTileM>, cute::Int<kTileN>, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Layout = cutlass::layout::RowMajor;
  // B's (N, K, L) strides. Every batch multiplies by the same B, and a static zero batch stride says so
  // at compile time: CuTe then leaves the batch mode out of B's TMA descriptor instead of asking
  // cuTensorMapEncodeTiled for a dimension of stride 0 and size > 1, which the driver may refuse (and
  // CUTLASS would only print the refusal). A's batch stride is 0 only for a single batch, as in
  // CUTLASS's own packed strides; D and the bias do not go through TMA.
  using LayoutB = std::conditional_t<BKMajor, cute::Stride<int64_t, cute::_1, cute::_0>,
                                     cute::Stride<cute::_1, int64_t, cute::_0>>;
  static constexpr int kAlign = 16 / sizeof(T);

  using Epilogue = TaggingEpilogue<typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, T, Layout, kAlign, T, Layout, kAlign,
      cutlass::epilogue::NoSmemWarpSpecialized>::CollectiveOp>;
  using Mainloop = WaitingMainloop<typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, Layout, kAlign, T, LayoutB, kAlign, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const GemmCall& c, const GemmHooks& hooks) {
    using namespace cute;
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideC = typename Kernel::StrideC;
    using StrideD = typename Kernel::StrideD;
    StrideA stride_a{};
    get<0>(stride_a) = c.lda;
    get<2>(stride_a) = c.a_batch;
    StrideB stride_b{};
    if constexpr (BKMajor)
      get<0>(stride_b) = c.ldb;
    else
      get<1>(stride_b) = c.ldb;
    StrideC stride_bias{};
    get<0>(stride_bias) = 0;  // one row of bias, broadcast down the rows
    get<2>(stride_bias) = 0;
    StrideD stride_d{};
    get<0>(stride_d) = c.ldd;
    get<2>(stride_d) = c.d_batch;

    const float beta = c.bias ? 1.0f : 0.0f;  // D = acc + beta * bias

    typename Device::Arguments args{
        c.batches > 1 ? cutlass::gemm::GemmUniversalMode::kBatched : cutlass::gemm::GemmUniversalMode::kGemm,
        {c.m, c.n, c.k, c.batches},
        {{reinterpret_cast<const T*>(c.a), stride_a, reinterpret_cast<const T*>(c.b), stride_b},
         hooks.band_tags,
         hooks.epoch,
         hooks.timeout_ns},
        {{{1.0f, beta}, reinterpret_cast<const T*>(c.bias), stride_bias, reinterpret_cast<T*>(c.d), stride_d},
         hooks.tile_tags,
         hooks.epoch}};
    int device = 0;
    SYMCOMM_CUDA_CHECK(cudaGetDevice(&device));
    args.hw_info = cutlass::KernelHardwareInfo{device, c.sms};
    args.scheduler.max_swizzle_size = 1;  // the comm kernel walks the tiles in the plain raster order
    using Raster = decltype(args.scheduler.raster_order);
    args.scheduler.raster_order = c.raster_along_m ? Raster::AlongM : Raster::AlongN;

    Device op;
    SYMCOMM_CHECK(Device::get_workspace_size(args) == 0, "the GEMM unexpectedly needs a CUTLASS workspace");
    SYMCOMM_CHECK(op.can_implement(args) == cutlass::Status::kSuccess,
                  "CUTLASS cannot run this GEMM (m=" + std::to_string(c.m) + ", n=" + std::to_string(c.n) +
                      ", k=" + std::to_string(c.k) + "): check 16-byte alignment of pointers and leading dimensions");
    auto stream = reinterpret_cast<cudaStream_t>(c.stream);
    SYMCOMM_CHECK(op.initialize(args, nullptr, stream) == cutlass::Status::kSuccess, "CUTLASS GEMM setup failed");
    SYMCOMM_CHECK(op.run(stream) == cutlass::Status::kSuccess, "CUTLASS GEMM launch failed");
    SYMCOMM_CUDA_CHECK(cudaGetLastError());
  }

  // The kernel that GemmUniversalAdapter::run launches, and the dynamic shared memory it launches it with.
  static void load() { load_kernel(cutlass::device_kernel<Kernel>); }
  static constexpr int kSharedBytes = Kernel::SharedStorageSize;
};

template <typename T>
void run_typed(const GemmCall& c, const GemmHooks& hooks) {
  if (c.b_k_major)
    FusedGemm<T, true>::run(c, hooks);
  else
    FusedGemm<T, false>::run(c, hooks);
}

template <typename T>
void load_typed() {
  FusedGemm<T, true>::load();
  FusedGemm<T, false>::load();
}

template <typename T>
int shared_bytes_typed(bool b_k_major) {
  return b_k_major ? FusedGemm<T, true>::kSharedBytes : FusedGemm<T, false>::kSharedBytes;
}

}  // namespace symcomm
