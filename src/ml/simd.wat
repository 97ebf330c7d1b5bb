;; Hot loops of our wasm kernels in 128-bit SIMD, run on the TF.js wasm backend's own memory
;; (imported), so they read and write its tensors in place. Compiled by `npm run generate`
;; (scripts/wat.mjs) into src/generated/simd.ts. Pointers are byte offsets; every channel count
;; is a multiple of 4 (the callers check).
(module
  (import "env" "memory" (memory 0))

  ;; For [rows, channels] float32 matrices u and v: adds sum(u) and sum(u * v) per channel into
  ;; the float64 arrays sums[0, channels) and sums[channels, 2 * channels). Blocks of 64 rows are
  ;; summed in float32 and then added in float64.
  (func (export "channel_sums")
    (param $u i32) (param $v i32) (param $rows i32) (param $channels i32) (param $sums i32)
    (local $stride i32) (local $r0 i32) (local $n i32) (local $c i32) (local $o i32) (local $end i32)
    (local $p i32) (local $a v128) (local $su v128) (local $suv v128)
    (local.set $stride (i32.shl (local.get $channels) (i32.const 2)))
    (block $blocks_done
      (loop $blocks
        (br_if $blocks_done (i32.ge_u (local.get $r0) (local.get $rows)))
        (local.set $n (i32.sub (local.get $rows) (local.get $r0)))
        (if (i32.gt_u (local.get $n) (i32.const 64)) (then (local.set $n (i32.const 64))))
        (local.set $c (i32.const 0))
        (block $cols_done
          (loop $cols
            (br_if $cols_done (i32.ge_u (local.get $c) (local.get $channels)))
            (local.set $o
              (i32.shl
                (i32.add (i32.mul (local.get $r0) (local.get $channels)) (local.get $c))
                (i32.const 2)))
            (local.set $end (i32.add (local.get $o) (i32.mul (local.get $n) (local.get $stride))))
            (local.set $su (v128.const f32x4 0 0 0 0))
            (local.set $suv (v128.const f32x4 0 0 0 0))
            (loop $rows
              (local.set $a (v128.load (i32.add (local.get $u) (local.get $o))))
              (local.set $su (f32x4.add (local.get $su) (local.get $a)))
              (local.set $suv
                (f32x4.add (local.get $suv)
                  (f32x4.mul (local.get $a) (v128.load (i32.add (local.get $v) (local.get $o))))))
              (local.set $o (i32.add (local.get $o) (local.get $stride)))
              (br_if $rows (i32.lt_u (local.get $o) (local.get $end))))
            ;; sums[c .. c + 4) += su; sums[channels + c .. channels + c + 4) += suv
            (local.set $p (i32.add (local.get $sums) (i32.shl (local.get $c) (i32.const 3))))
            (call $add_f64x4 (local.get $p) (local.get $su))
            (call $add_f64x4
              (i32.add (local.get $p) (i32.shl (local.get $channels) (i32.const 3)))
              (local.get $suv))
            (local.set $c (i32.add (local.get $c) (i32.const 4)))
            (br $cols)))
        (local.set $r0 (i32.add (local.get $r0) (i32.const 64)))
        (br $blocks))))

  ;; Four float64 at p += the four float32 lanes of x.
  (func $add_f64x4 (param $p i32) (param $x v128)
    (v128.store (local.get $p)
      (f64x2.add (v128.load (local.get $p)) (f64x2.promote_low_f32x4 (local.get $x))))
    (v128.store offset=16 (local.get $p)
      (f64x2.add
        (v128.load offset=16 (local.get $p))
        (f64x2.promote_low_f32x4
          (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $x) (local.get $x))))))

  ;; y = x * scale[c] + shift[c] for `count` float32 values in rows of `channels`.
  (func (export "affine")
    (param $x i32) (param $y i32) (param $count i32) (param $channels i32)
    (param $scale i32) (param $shift i32)
    (local $end i32) (local $row i32) (local $c i32)
    (local.set $row (i32.shl (local.get $channels) (i32.const 2)))
    (local.set $end (i32.add (local.get $x) (i32.shl (local.get $count) (i32.const 2))))
    (block $done
      (loop $rows
        (br_if $done (i32.ge_u (local.get $x) (local.get $end)))
        (local.set $c (i32.const 0))
        (loop $cols
          (v128.store (i32.add (local.get $y) (local.get $c))
            (f32x4.add
              (f32x4.mul
                (v128.load (i32.add (local.get $x) (local.get $c)))
                (v128.load (i32.add (local.get $scale) (local.get $c))))
              (v128.load (i32.add (local.get $shift) (local.get $c)))))
          (local.set $c (i32.add (local.get $c) (i32.const 16)))
          (br_if $cols (i32.lt_u (local.get $c) (local.get $row))))
        (local.set $x (i32.add (local.get $x) (local.get $row)))
        (local.set $y (i32.add (local.get $y) (local.get $row)))
        (br $rows))))

  ;; out = a[c] * u + b[c] * v + k[c] for `count` float32 values in rows of `channels`.
  (func (export "affine2")
    (param $u i32) (param $v i32) (param $out i32) (param $count i32) (param $channels i32)
    (param $a i32) (param $b i32) (param $k i32)
    (local $end i32) (local $row i32) (local $c i32)
    (local.set $row (i32.shl (local.get $channels) (i32.const 2)))
    (local.set $end (i32.add (local.get $u) (i32.shl (local.get $count) (i32.const 2))))
    (block $done
      (loop $rows
        (br_if $done (i32.ge_u (local.get $u) (local.get $end)))
        (local.set $c (i32.const 0))
        (loop $cols
          (v128.store (i32.add (local.get $out) (local.get $c))
            (f32x4.add
              (f32x4.add
                (f32x4.mul
                  (v128.load (i32.add (local.get $u) (local.get $c)))
                  (v128.load (i32.add (local.get $a) (local.get $c))))
                (f32x4.mul
                  (v128.load (i32.add (local.get $v) (local.get $c)))
                  (v128.load (i32.add (local.get $b) (local.get $c)))))
              (v128.load (i32.add (local.get $k) (local.get $c)))))
          (local.set $c (i32.add (local.get $c) (i32.const 16)))
          (br_if $cols (i32.lt_u (local.get $c) (local.get $row))))
        (local.set $u (i32.add (local.get $u) (local.get $row)))
        (local.set $v (i32.add (local.get $v) (local.get $row)))
        (local.set $out (i32.add (local.get $out) (local.get $row)))
        (br $rows)))))
