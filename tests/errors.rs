//! Bad input gives a typed, readable error — never a panic or wrong numbers.

mod common;

use common::*;
use xattn::plan::{Plan, Request};
use xattn::{Attention, AttnShape, Error, Path};

#[test]
fn shape_validation_without_a_gpu() {
    let ok = AttnShape::from_qkv([2, 5, 4, 8], [2, 7, 2, 8], [2, 7, 2, 3]).unwrap();
    assert_eq!((ok.m, ok.n, ok.group(), ok.d_v), (5, 7, 2, 3));
    type Case = ([usize; 4], [usize; 4], [usize; 4], &'static str);
    let cases: [Case; 7] = [
        ([1, 0, 1, 8], [1, 3, 1, 8], [1, 3, 1, 8], "zero dimension"),
        ([2, 4, 1, 8], [1, 3, 1, 8], [1, 3, 1, 8], "batch"),
        ([1, 4, 1, 8], [1, 3, 1, 8], [1, 4, 1, 8], "rows"),
        ([1, 4, 1, 8], [1, 3, 1, 7], [1, 3, 1, 8], "head dim"),
        ([1, 4, 3, 8], [1, 3, 2, 8], [1, 3, 2, 8], "multiple"),
        ([1, 4, 2, 8], [1, 3, 2, 8], [1, 3, 1, 8], "heads"),
        (
            [1 << 40, 1 << 40, 1, 8],
            [1 << 40, 3, 1, 8],
            [1 << 40, 3, 1, 8],
            "overflows",
        ),
    ];
    for (q, k, v, needle) in cases {
        let err = AttnShape::from_qkv(q, k, v).unwrap_err();
        assert!(matches!(err, Error::Shape(_)), "{q:?} {k:?} {v:?}: {err:?}");
        assert!(
            err.to_string().contains(needle),
            "`{err}` should mention {needle}"
        );
    }
}

#[test]
fn planner_names_the_limit_when_no_split_helps() {
    // One row of scores (N keys) larger than a binding: three-pass cannot split further.
    let shape = AttnShape {
        batch: 1,
        m: 4,
        n: 40_000_000,
        q_heads: 1,
        kv_heads: 1,
        d_k: 1,
        d_v: 1,
    };
    let req = Request {
        shape,
        scale: 1.0,
        weights: true,
        path: None,
        masks: Default::default(),
        dtype: xattn::DType::F32,
        out_dtype: xattn::DType::F32,
        stats: Default::default(),
        pool: None,
        fused: None,
    };
    let err = Plan::new(&req, &CAPS).unwrap_err();
    match &err {
        Error::Limit {
            limit_name,
            asked,
            limit,
            ..
        } => {
            assert_eq!(*limit_name, "max_storage_buffer_binding_size");
            assert!(asked > limit);
        }
        other => panic!("expected a limit error, got {other:?}"),
    }
    // An input bound whole that exceeds a binding.
    let big = AttnShape {
        batch: 1,
        m: 1 << 20,
        n: 8,
        q_heads: 1,
        kv_heads: 1,
        d_k: 64,
        d_v: 64,
    };
    let err = Plan::new(
        &Request {
            shape: big,
            scale: 1.0,
            weights: false,
            path: None,
            masks: Default::default(),
            dtype: xattn::DType::F32,
            out_dtype: xattn::DType::F32,
            stats: Default::default(),
            pool: None,
            fused: None,
        },
        &CAPS,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("max_storage_buffer_binding_size"),
        "{err}"
    );
    // Weights are three-pass only; large head dims are three-pass only.
    let s = AttnShape {
        batch: 1,
        m: 3,
        n: 5,
        q_heads: 1,
        kv_heads: 1,
        d_k: 8,
        d_v: 8,
    };
    let err = Plan::new(
        &Request {
            shape: s,
            scale: 1.0,
            weights: true,
            path: Some(Path::Fused),
            masks: Default::default(),
            dtype: xattn::DType::F32,
            out_dtype: xattn::DType::F32,
            stats: Default::default(),
            pool: None,
            fused: None,
        },
        &CAPS,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    let wide = AttnShape { d_k: 300, ..s };
    let err = Plan::new(
        &Request {
            shape: wide,
            scale: 1.0,
            weights: false,
            path: Some(Path::SplitK),
            masks: Default::default(),
            dtype: xattn::DType::F32,
            out_dtype: xattn::DType::F32,
            stats: Default::default(),
            pool: None,
            fused: None,
        },
        &CAPS,
    )
    .unwrap_err();
    assert!(err.to_string().contains("256"), "{err}");
    let auto = Plan::new(
        &Request {
            shape: wide,
            scale: 1.0,
            weights: false,
            path: None,
            masks: Default::default(),
            dtype: xattn::DType::F32,
            out_dtype: xattn::DType::F32,
            stats: Default::default(),
            pool: None,
            fused: None,
        },
        &CAPS,
    )
    .unwrap();
    assert_eq!(auto.path(), Path::ThreePass);
}

#[test]
fn bad_host_input_is_an_error_on_the_device_too() {
    let Some(engine) = engine() else { return };
    let s = AttnShape {
        batch: 1,
        m: 3,
        n: 5,
        q_heads: 2,
        kv_heads: 2,
        d_k: 4,
        d_v: 4,
    };
    let (q, k, v) = qkv(&s, 1.0, 1);
    let opts = Attention::default();
    // Wrong slice length.
    let err = engine
        .attention_host(
            (&q[1..], s.q_dims()),
            (&k, s.k_dims()),
            (&v, s.v_dims()),
            &opts,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Length {
                expected: 24,
                got: 23,
                ..
            }
        ),
        "{err:?}"
    );
    // Mismatched heads between K and V tensors.
    let err = engine
        .attention_host(
            (&q, s.q_dims()),
            (&k, s.k_dims()),
            (&v, [1, 5, 1, 8]),
            &opts,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err:?}");
    // Non-finite scale.
    let err = engine
        .attention_host(
            (&q, s.q_dims()),
            (&k, s.k_dims()),
            (&v, s.v_dims()),
            &opts.clone().with_scale(f32::NAN),
        )
        .unwrap_err();
    assert!(err.to_string().contains("scale"), "{err}");
    // A tensor of the wrong rank.
    let q3 = engine.upload(&q, &[3, 2, 4]).unwrap();
    let k4 = engine.upload(&k, &s.k_dims()).unwrap();
    let v4 = engine.upload(&v, &s.v_dims()).unwrap();
    let err = engine.attention(&q3, &k4, &v4, &opts).unwrap_err();
    assert!(err.to_string().contains("4 dims"), "{err}");
    // An output of the wrong shape for the call.
    let q4 = engine.upload(&q, &s.q_dims()).unwrap();
    let other = AttnShape { m: 4, ..s };
    let o_other = engine
        .upload(
            &random(other.o_dims().iter().product(), 1.0, 3),
            &other.o_dims(),
        )
        .unwrap();
    let err = engine
        .prepare_into((&q4, &k4, &v4), &o_other, None, &opts)
        .unwrap_err();
    assert!(err.to_string().contains("output o"), "{err}");
    // Merge of mismatched shards.
    let o = vec![0.5; 24];
    let err = engine
        .merge_host([1, 3, 2, 4], &[(&o, &[0.0; 6]), (&o, &[0.0; 5])])
        .unwrap_err();
    assert!(matches!(err, Error::Length { .. }), "{err:?}");
    assert!(matches!(
        engine.merge_host([1, 3, 2, 4], &[]).unwrap_err(),
        Error::Shape(_)
    ));
}
