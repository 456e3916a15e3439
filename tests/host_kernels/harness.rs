//! The host harness itself: it must fail where a GPU would misbehave (code that
//! relies on warp lockstep, a shuffle waiting for lanes that returned, a launch
//! plan whose arguments or grid are wrong, a write out of bounds), and give
//! CUDA's answers for barriers, shuffles, votes, dynamic shared memory and
//! atomics. Its own kernels are in `kernels/host/selftest.cu`.

use candle_core::{CpuStorage, DType, Result};
use sentence_mtl::ops::host::{HostBuffer, HostExecutor};
use sentence_mtl::ops::launch::{self, Alloc, Buffer, Launch};

use crate::common::{random_values, rng};

/// Runs `launches` on copies of `inputs` into fresh `outputs`.
fn run(inputs: &[CpuStorage], outputs: &[Alloc], launches: &[Launch]) -> Result<Vec<CpuStorage>> {
    let buffers = inputs
        .iter()
        .map(HostBuffer::upload)
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&HostBuffer> = buffers.iter().collect();
    launch::run(&HostExecutor, &refs, outputs, launches)?
        .iter()
        .map(HostBuffer::download)
        .collect()
}

fn selftest(kernel: &str, grid: u32, block: u32) -> Launch {
    Launch::new("selftest", kernel, (grid, 1, 1), (block, 1, 1))
}

fn f32s(s: &CpuStorage) -> Vec<f32> {
    s.as_slice::<f32>().expect("f32 storage").to_vec()
}

fn error(result: Result<Vec<CpuStorage>>) -> String {
    match result {
        Ok(_) => panic!("the launch should have failed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_warp_reduction_that_relies_on_lockstep_gives_a_wrong_sum() -> Result<()> {
    let x: Vec<f32> = random_values(&mut rng(7), 32, 1.0)
        .iter()
        .map(|&v| v as f32 + 2.0)
        .collect();
    let want: f32 = x.iter().sum();
    let out = Alloc {
        dtype: DType::F32,
        len: 1,
    };
    let launch = |kernel| {
        selftest(kernel, 1, 32)
            .ptr(Buffer::Input(0), 0)
            .ptr(Buffer::Output(0), 0)
    };
    let input = [CpuStorage::F32(x)];
    let synced = f32s(&run(&input, &[out], &[launch("selftest_warp_sum_synced")])?[0])[0];
    assert!(
        (synced - want).abs() <= 1e-4 * want.abs(),
        "{synced} vs {want}"
    );
    let lockstep = f32s(&run(&input, &[out], &[launch("selftest_warp_sum_lockstep")])?[0])[0];
    assert!(
        (lockstep - want).abs() > 1e-3,
        "lockstep reduction gave the right sum {lockstep}: the harness runs warps in lockstep"
    );
    Ok(())
}

#[test]
fn a_shuffle_waiting_for_returned_lanes_is_a_deadlock_error() {
    let out = Alloc {
        dtype: DType::I32,
        len: 1,
    };
    let launch = selftest("selftest_shuffle_after_exit", 1, 32).ptr(Buffer::Output(0), 0);
    let message = error(run(&[], &[out], &[launch]));
    assert!(message.contains("deadlocked"), "{message}");
    assert!(message.contains("31 have returned"), "{message}");
}

#[test]
fn shuffles_votes_barriers_and_block_atomics_give_cuda_answers() -> Result<()> {
    let threads = 64usize;
    let out = Alloc {
        dtype: DType::I32,
        len: 4 * threads,
    };
    let launch = selftest("selftest_warp_ops", 1, threads as u32).ptr(Buffer::Output(0), 0);
    let got = run(&[], &[out], &[launch])?;
    let got = got[0].as_slice::<i32>()?;
    let total: i32 = (0..threads as i32).sum();
    for t in 0..threads as i32 {
        let row = &got[4 * t as usize..4 * t as usize + 4];
        // shfl_down by 1 within segments of 8: the last lane of a segment keeps its value.
        let down = if t % 8 == 7 { t } else { t + 1 };
        assert_eq!(row, [t ^ 5, down, 0x5555_5555, total], "thread {t}");
    }
    Ok(())
}

#[test]
fn dynamic_shared_memory_is_sized_by_the_launch() -> Result<()> {
    let (blocks, n) = (5usize, 200usize);
    let x: Vec<f32> = (0..blocks * n).map(|i| i as f32).collect();
    let out = Alloc {
        dtype: DType::F32,
        len: blocks * n,
    };
    let mut launch = selftest("selftest_reverse_in_shared", blocks as u32, 256)
        .ptr(Buffer::Input(0), 0)
        .ptr(Buffer::Output(0), 0)
        .i32(n as i32);
    launch.shared_bytes = (n * 4) as u32;
    let got = f32s(&run(&[CpuStorage::F32(x)], &[out], &[launch])?[0]);
    for b in 0..blocks {
        for t in 0..n {
            assert_eq!(got[b * n + t], (b * n + n - 1 - t) as f32);
        }
    }
    Ok(())
}

#[test]
fn atomics_are_atomic_across_blocks_running_in_parallel() -> Result<()> {
    let out = Alloc {
        dtype: DType::I64,
        len: 1,
    };
    let launch = selftest("selftest_count", 300, 256).ptr(Buffer::Output(0), 0);
    let got = run(&[], &[out], &[launch])?;
    // Fresh allocations are all ones (-1): the count wraps from there.
    assert_eq!(got[0].as_slice::<i64>()?[0], 300 * 256 - 1);
    Ok(())
}

#[test]
fn plans_with_wrong_arguments_or_configurations_are_errors() {
    let out = Alloc {
        dtype: DType::I32,
        len: 4 * 32,
    };
    // An i64 where the kernel takes an int pointer.
    let wrong_type = selftest("selftest_warp_ops", 1, 32).i64(0);
    let message = error(run(&[], &[out], &[wrong_type]));
    assert!(
        message.contains("the launch passes (i64) but the kernel takes (p:i32)"),
        "{message}"
    );
    let too_many = selftest("selftest_warp_ops", 1, 32)
        .ptr(Buffer::Output(0), 0)
        .i32(1);
    let message = error(run(&[], &[out], &[too_many]));
    assert!(
        message.contains("(p:i32,i32) but the kernel takes (p:i32)"),
        "{message}"
    );
    let unknown = selftest("no_such_kernel", 1, 32);
    assert!(error(run(&[], &[out], &[unknown])).contains("no kernel named no_such_kernel"));
    let wide = selftest("selftest_warp_ops", 1, 2048).ptr(Buffer::Output(0), 0);
    let message = error(run(&[], &[out], &[wide]));
    assert!(
        message.contains("invalid launch configuration"),
        "{message}"
    );
    let tall = Launch::new("selftest", "selftest_warp_ops", (1, 70_000, 1), (32, 1, 1))
        .ptr(Buffer::Output(0), 0);
    let message = error(run(&[], &[out], &[tall]));
    assert!(
        message.contains("grid dimension above the device limit"),
        "{message}"
    );
    let missing = selftest("selftest_warp_ops", 1, 32).ptr(Buffer::Output(3), 0);
    let message = error(run(&[], &[out], &[missing]));
    assert!(message.contains("missing Output(3)"), "{message}");
}

#[test]
fn a_write_past_the_end_of_a_buffer_is_an_error() {
    // 32 threads write 4 ints each into room for 24 threads (into the guard).
    let small = Alloc {
        dtype: DType::I32,
        len: 4 * 24,
    };
    let launch = selftest("selftest_warp_ops", 1, 32).ptr(Buffer::Output(0), 0);
    let message = error(run(&[], &[small], &[launch]));
    assert!(
        message.contains("wrote outside an output buffer"),
        "{message}"
    );
}

/// Sizes past the kernels' `int` indices (or the grid's 65535 limit) are an
/// `Err` from the launch plan, before anything runs. Broadcast (stride-0)
/// views give the sizes without the memory.
#[test]
fn launch_plans_refuse_sizes_past_the_kernels_32_bit_indices() -> Result<()> {
    use candle_core::{Device, Tensor};
    use sentence_mtl::ops;
    let dev = Device::Cpu;
    let past = i32::MAX as usize + 1;
    let message = |r: Result<Tensor>| r.expect_err("an error").to_string();
    // mean pool: T past i32, and H needing more than 65535 column chunks.
    let hidden = Tensor::ones((1, 1, 1), DType::F32, &dev)?.broadcast_as((1, past, 1))?;
    let mask = Tensor::ones((1, 1), DType::U8, &dev)?.broadcast_as((1, past))?;
    let m = message(ops::host::run(|| ops::masked_mean_pool(&hidden, &mask)));
    assert!(m.contains(&format!("T = {past} is too large")), "{m}");
    let wide = 65535 * 32 + 1;
    let hidden = Tensor::ones((1, 1, 1), DType::F32, &dev)?.broadcast_as((1, 1, wide))?;
    let mask = Tensor::ones((1, 1), DType::U8, &dev)?;
    let m = message(ops::host::run(|| ops::masked_mean_pool(&hidden, &mask)));
    assert!(m.contains("shape too large for the CUDA kernel"), "{m}");
    // cosine: N past i32 rows.
    let rows = Tensor::ones((1, 4), DType::F32, &dev)?.broadcast_as((past, 4))?;
    let m = message(ops::host::run(|| ops::l2_normalize(&rows)));
    assert!(m.contains(&format!("N = {past} is too large")), "{m}");
    let m = message(ops::host::run(|| ops::cosine_similarity(&rows, &rows)));
    assert!(m.contains(&format!("N = {past} is too large")), "{m}");
    Ok(())
}

/// The harness's `__half` / `__nv_bfloat16` round to nearest even exactly as
/// the device (and the `half` crate) do: ties, subnormals, the overflow edge,
/// infinities and NaN, and random values over the whole f32 range.
#[test]
fn half_and_bfloat16_round_to_nearest_even_like_the_device() -> Result<()> {
    use half::{bf16, f16};
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        1e-8,
        2f32.powi(-25),       // the tie below f16's smallest subnormal
        2f32.powi(-24),       // f16's smallest subnormal
        1.5 * 2f32.powi(-24), // a subnormal tie
        6.097555e-5,          // just below f16's smallest normal
        1.0 + 2f32.powi(-10), // an f16 value
        1.0 + 2f32.powi(-11), // a tie between two f16 values
        1.0 + 2f32.powi(-7),  // a bf16 value
        1.0 + 2f32.powi(-8),  // a tie between two bf16 values
        f32::MAX,             // rounds to bf16 infinity
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200_000 {
        // Random bit patterns: every exponent, sign and mantissa.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let v = f32::from_bits(state as u32);
        if !v.is_nan() {
            x.push(v);
        }
    }
    let n = x.len();
    let outs = [
        Alloc {
            dtype: DType::F16,
            len: n,
        },
        Alloc {
            dtype: DType::BF16,
            len: n,
        },
        Alloc {
            dtype: DType::F32,
            len: 2 * n,
        },
    ];
    let launch = selftest("selftest_round", n.div_ceil(256) as u32, 256)
        .ptr(Buffer::Input(0), 0)
        .ptr(Buffer::Output(0), 0)
        .ptr(Buffer::Output(1), 0)
        .ptr(Buffer::Output(2), 0)
        .i32(n as i32);
    let got = run(&[CpuStorage::F32(x.clone())], &outs, &[launch])?;
    let (h, b, back) = (
        got[0].as_slice::<f16>()?,
        got[1].as_slice::<bf16>()?,
        got[2].as_slice::<f32>()?,
    );
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(h[i].to_bits(), f16::from_f32(v).to_bits(), "f16 of {v:e}");
        assert_eq!(b[i].to_bits(), bf16::from_f32(v).to_bits(), "bf16 of {v:e}");
        assert_eq!(
            back[2 * i].to_bits(),
            f16::from_f32(v).to_f32().to_bits(),
            "f16 back {v:e}"
        );
        assert_eq!(
            back[2 * i + 1].to_bits(),
            bf16::from_f32(v).to_f32().to_bits(),
            "bf16 back {v:e}"
        );
    }
    // NaN stays NaN.
    let nan = run(
        &[CpuStorage::F32(vec![f32::NAN])],
        &outs.map(|a| Alloc {
            len: a.len.min(2),
            ..a
        }),
        &[selftest("selftest_round", 1, 32)
            .ptr(Buffer::Input(0), 0)
            .ptr(Buffer::Output(0), 0)
            .ptr(Buffer::Output(1), 0)
            .ptr(Buffer::Output(2), 0)
            .i32(1)],
    )?;
    assert!(nan[0].as_slice::<f16>()?[0].is_nan() && nan[1].as_slice::<bf16>()?[0].is_nan());
    Ok(())
}
