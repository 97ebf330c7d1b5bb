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
        (br $rows))))

  ;; The input patches of a 2-D convolution as the rows of `cols`: row (fh, fw, c) holds, for
  ;; every output position n = (b, oh, ow), x at (b, oh*strideH + fh - padTop,
  ;; ow*strideW + fw - padLeft, c), or 0 in the padding. `xt` is x channel-major: [c, b, h, w].
  (func (export "patches")
    (param $xt i32) (param $cols i32) (param $batch i32) (param $height i32) (param $width i32)
    (param $channels i32) (param $filterH i32) (param $filterW i32) (param $strideH i32)
    (param $strideW i32) (param $padTop i32) (param $padLeft i32) (param $outH i32) (param $outW i32)
    (local $fh i32) (local $fw i32) (local $c i32) (local $b i32) (local $oh i32) (local $ow i32)
    (local $ih i32) (local $iw i32) (local $plane i32) (local $row i32) (local $inside i32)
    (loop $fhs
      (local.set $fw (i32.const 0))
      (loop $fws
        (local.set $c (i32.const 0))
        (loop $cs
          (local.set $b (i32.const 0))
          (loop $bs
            ;; the (c, b) plane of xt
            (local.set $plane
              (i32.add (local.get $xt)
                (i32.shl
                  (i32.mul
                    (i32.add (i32.mul (local.get $c) (local.get $batch)) (local.get $b))
                    (i32.mul (local.get $height) (local.get $width)))
                  (i32.const 2))))
            (local.set $oh (i32.const 0))
            (loop $ohs
              (local.set $ih
                (i32.sub
                  (i32.add (i32.mul (local.get $oh) (local.get $strideH)) (local.get $fh))
                  (local.get $padTop)))
              (local.set $row
                (i32.add (local.get $plane)
                  (i32.shl (i32.mul (local.get $ih) (local.get $width)) (i32.const 2))))
              (local.set $ow (i32.const 0))
              (loop $ows
                (local.set $iw
                  (i32.sub
                    (i32.add (i32.mul (local.get $ow) (local.get $strideW)) (local.get $fw))
                    (local.get $padLeft)))
                (local.set $inside
                  (i32.and
                    (i32.lt_u (local.get $ih) (local.get $height))
                    (i32.lt_u (local.get $iw) (local.get $width))))
                (f32.store (local.get $cols)
                  (if (result f32) (local.get $inside)
                    (then (f32.load (i32.add (local.get $row) (i32.shl (local.get $iw) (i32.const 2)))))
                    (else (f32.const 0))))
                (local.set $cols (i32.add (local.get $cols) (i32.const 4)))
                (local.set $ow (i32.add (local.get $ow) (i32.const 1)))
                (br_if $ows (i32.lt_u (local.get $ow) (local.get $outW))))
              (local.set $oh (i32.add (local.get $oh) (i32.const 1)))
              (br_if $ohs (i32.lt_u (local.get $oh) (local.get $outH))))
            (local.set $b (i32.add (local.get $b) (i32.const 1)))
            (br_if $bs (i32.lt_u (local.get $b) (local.get $batch))))
          (local.set $c (i32.add (local.get $c) (i32.const 1)))
          (br_if $cs (i32.lt_u (local.get $c) (local.get $channels))))
        (local.set $fw (i32.add (local.get $fw) (i32.const 1)))
        (br_if $fws (i32.lt_u (local.get $fw) (local.get $filterW))))
      (local.set $fh (i32.add (local.get $fh) (i32.const 1)))
      (br_if $fhs (i32.lt_u (local.get $fh) (local.get $filterH)))))

  ;; MaxPool's gradient (NHWC): for every window and channel, dy goes to the window's first
  ;; maximum in x (row-major window order), added into dx (zeroed by the caller). Four channels
  ;; at a time: the window's maxima, then a mask of the first position holding each.
  (func (export "max_pool_grad")
    (param $x i32) (param $dy i32) (param $dx i32) (param $batch i32) (param $height i32)
    (param $width i32) (param $channels i32) (param $filterH i32) (param $filterW i32)
    (param $strideH i32) (param $strideW i32) (param $padTop i32) (param $padLeft i32)
    (param $outH i32) (param $outW i32)
    (local $b i32) (local $oh i32) (local $ow i32) (local $h0 i32) (local $w0 i32) (local $c i32)
    (local $row i32) (local $fh i32) (local $fw i32) (local $ih i32) (local $iw i32) (local $p i32)
    (local $pass i32) (local $max v128) (local $d v128) (local $taken v128) (local $mask v128)
    (local.set $row (i32.shl (local.get $channels) (i32.const 2)))
    (loop $bs
      (local.set $oh (i32.const 0))
      (loop $ohs
        (local.set $h0 (i32.sub (i32.mul (local.get $oh) (local.get $strideH)) (local.get $padTop)))
        (local.set $ow (i32.const 0))
        (loop $ows
          (local.set $w0 (i32.sub (i32.mul (local.get $ow) (local.get $strideW)) (local.get $padLeft)))
          (local.set $c (i32.const 0))
          (loop $cs
            (local.set $max (v128.const f32x4 -inf -inf -inf -inf))
            (local.set $taken (v128.const i32x4 0 0 0 0))
            (local.set $d (v128.load (i32.add (local.get $dy) (local.get $c))))
            ;; pass 0 finds the maxima, pass 1 hands dy to the first position of each
            (local.set $pass (i32.const 0))
            (loop $passes
              (local.set $fh (i32.const 0))
              (loop $fhs
                (local.set $ih (i32.add (local.get $h0) (local.get $fh)))
                (local.set $fw (i32.const 0))
                (loop $fws
                  (local.set $iw (i32.add (local.get $w0) (local.get $fw)))
                  (if (i32.and
                        (i32.lt_u (local.get $ih) (local.get $height))
                        (i32.lt_u (local.get $iw) (local.get $width)))
                    (then
                      (local.set $p
                        (i32.add
                          (i32.mul
                            (i32.add
                              (i32.mul
                                (i32.add (i32.mul (local.get $b) (local.get $height)) (local.get $ih))
                                (local.get $width))
                              (local.get $iw))
                            (local.get $row))
                          (local.get $c)))
                      (if (i32.eqz (local.get $pass))
                        (then
                          (local.set $max
                            (f32x4.max (local.get $max) (v128.load (i32.add (local.get $x) (local.get $p))))))
                        (else
                          (local.set $mask
                            (v128.andnot
                              (f32x4.eq (v128.load (i32.add (local.get $x) (local.get $p))) (local.get $max))
                              (local.get $taken)))
                          (v128.store (i32.add (local.get $dx) (local.get $p))
                            (f32x4.add
                              (v128.load (i32.add (local.get $dx) (local.get $p)))
                              (v128.and (local.get $d) (local.get $mask))))
                          (local.set $taken (v128.or (local.get $taken) (local.get $mask)))))))
                  (local.set $fw (i32.add (local.get $fw) (i32.const 1)))
                  (br_if $fws (i32.lt_u (local.get $fw) (local.get $filterW))))
                (local.set $fh (i32.add (local.get $fh) (i32.const 1)))
                (br_if $fhs (i32.lt_u (local.get $fh) (local.get $filterH))))
              (local.set $pass (i32.add (local.get $pass) (i32.const 1)))
              (br_if $passes (i32.lt_u (local.get $pass) (i32.const 2))))
            (local.set $c (i32.add (local.get $c) (i32.const 16)))
            (br_if $cs (i32.lt_u (local.get $c) (local.get $row))))
          (local.set $dy (i32.add (local.get $dy) (local.get $row)))
          (local.set $ow (i32.add (local.get $ow) (i32.const 1)))
          (br_if $ows (i32.lt_u (local.get $ow) (local.get $outW))))
        (local.set $oh (i32.add (local.get $oh) (i32.const 1)))
        (br_if $ohs (i32.lt_u (local.get $oh) (local.get $outH))))
      (local.set $b (i32.add (local.get $b) (i32.const 1)))
      (br_if $bs (i32.lt_u (local.get $b) (local.get $batch))))))
