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
      (br_if $bs (i32.lt_u (local.get $b) (local.get $batch)))))
  ;; C[m x n] = A[m x k] x B[k x n] (float32; n a multiple of 8, k > 0), C row-major: A's element
  ;; (i, l) at a + i * sai + l * sal bytes and B's (l, j) at b + l * sbl + j * sbj, so that
  ;; transposed operands are read in place.
  ;; Tiles of 4 x 8 of C (one row at a time past a multiple of 4), over blocks of 256 of k: the
  ;; block of B under a tile (256 x 8) is copied to `packed` (8 KiB), where it stays in cache
  ;; across all rows (B's own rows can be a power of 2 bytes apart, which maps them all to a few
  ;; cache sets). wasm's own matmul packs all of B on every call instead, which costs more than
  ;; the product when B is a layer's weights, new at every step.
  (func (export "matmul")
    (param $a i32) (param $b i32) (param $c i32) (param $m i32) (param $k i32) (param $n i32)
    (param $sai i32) (param $sal i32) (param $sbl i32) (param $sbj i32) (param $packed i32)
    (local $ld i32) (local $l0 i32) (local $depth i32) (local $j i32) (local $i i32)
    (local $pa i32) (local $pb i32) (local $pc i32) (local $to i32) (local $end i32) (local $jj i32)
    (local.set $ld (i32.shl (local.get $n) (i32.const 2)))
    (loop $blocks
      (local.set $depth (i32.sub (local.get $k) (local.get $l0)))
      (if (i32.gt_u (local.get $depth) (i32.const 256)) (then (local.set $depth (i32.const 256))))
      (local.set $j (i32.const 0))
      (loop $cols
        (local.set $pa (i32.add (local.get $a) (i32.mul (local.get $l0) (local.get $sal))))
        (local.set $pb
          (i32.add (local.get $b)
            (i32.add (i32.mul (local.get $l0) (local.get $sbl)) (i32.mul (local.get $j) (local.get $sbj)))))
        (local.set $pc (i32.add (local.get $c) (i32.shl (local.get $j) (i32.const 2))))
        (local.set $to (local.get $packed))
        (local.set $end (i32.add (local.get $packed) (i32.shl (local.get $depth) (i32.const 5))))
        (loop $pack
          (if (i32.eq (local.get $sbj) (i32.const 4))
            (then
              (v128.store (local.get $to) (v128.load (local.get $pb)))
              (v128.store offset=16 (local.get $to) (v128.load offset=16 (local.get $pb))))
            (else
              (local.set $jj (i32.const 0))
              (loop $gather
                (f32.store (i32.add (local.get $to) (i32.shl (local.get $jj) (i32.const 2)))
                  (f32.load (i32.add (local.get $pb) (i32.mul (local.get $jj) (local.get $sbj)))))
                (local.set $jj (i32.add (local.get $jj) (i32.const 1)))
                (br_if $gather (i32.lt_u (local.get $jj) (i32.const 8))))))
          (local.set $pb (i32.add (local.get $pb) (local.get $sbl)))
          (local.set $to (i32.add (local.get $to) (i32.const 32)))
          (br_if $pack (i32.lt_u (local.get $to) (local.get $end))))
        (local.set $i (i32.const 0))
        (block $tiles_done
          (loop $tiles
            (br_if $tiles_done (i32.gt_u (i32.add (local.get $i) (i32.const 4)) (local.get $m)))
            (call $tile4 (local.get $pa) (local.get $packed) (local.get $pc) (local.get $depth)
              (local.get $ld) (local.get $sai) (local.get $sal) (local.get $l0))
            (local.set $pa (i32.add (local.get $pa) (i32.shl (local.get $sai) (i32.const 2))))
            (local.set $pc (i32.add (local.get $pc) (i32.shl (local.get $ld) (i32.const 2))))
            (local.set $i (i32.add (local.get $i) (i32.const 4)))
            (br $tiles)))
        (block $rows_done
          (loop $rows
            (br_if $rows_done (i32.ge_u (local.get $i) (local.get $m)))
            (call $tile1 (local.get $pa) (local.get $packed) (local.get $pc) (local.get $depth)
              (local.get $sal) (local.get $l0))
            (local.set $pa (i32.add (local.get $pa) (local.get $sai)))
            (local.set $pc (i32.add (local.get $pc) (local.get $ld)))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $rows)))
        (local.set $j (i32.add (local.get $j) (i32.const 8)))
        (br_if $cols (i32.lt_u (local.get $j) (local.get $n))))
      (local.set $l0 (i32.add (local.get $l0) (i32.const 256)))
      (br_if $blocks (i32.lt_u (local.get $l0) (local.get $k)))))

  ;; The 4 x 8 tile of C at pc (rows ld bytes apart): the product of 4 rows of A from pa (rows
  ;; sai bytes apart, elements sal apart) and `depth` packed rows of 8 of B from pb, added to
  ;; the tile unless `add` is 0.
  (func $tile4
    (param $pa i32) (param $pb i32) (param $pc i32) (param $depth i32) (param $ld i32)
    (param $sai i32) (param $sal i32) (param $add i32)
    (local $pa1 i32) (local $pa2 i32) (local $pa3 i32)
    (local $pc1 i32) (local $pc2 i32) (local $pc3 i32) (local $b0 v128) (local $b1 v128) (local $x v128)
    (local $c00 v128) (local $c01 v128) (local $c10 v128) (local $c11 v128)
    (local $c20 v128) (local $c21 v128) (local $c30 v128) (local $c31 v128)
    (local.set $pa1 (i32.add (local.get $pa) (local.get $sai)))
    (local.set $pa2 (i32.add (local.get $pa1) (local.get $sai)))
    (local.set $pa3 (i32.add (local.get $pa2) (local.get $sai)))
    (local.set $pc1 (i32.add (local.get $pc) (local.get $ld)))
    (local.set $pc2 (i32.add (local.get $pc1) (local.get $ld)))
    (local.set $pc3 (i32.add (local.get $pc2) (local.get $ld)))
    (if (local.get $add)
      (then
        (local.set $c00 (v128.load (local.get $pc)))
        (local.set $c01 (v128.load offset=16 (local.get $pc)))
        (local.set $c10 (v128.load (local.get $pc1)))
        (local.set $c11 (v128.load offset=16 (local.get $pc1)))
        (local.set $c20 (v128.load (local.get $pc2)))
        (local.set $c21 (v128.load offset=16 (local.get $pc2)))
        (local.set $c30 (v128.load (local.get $pc3)))
        (local.set $c31 (v128.load offset=16 (local.get $pc3)))))
    (loop $depths
      (local.set $b0 (v128.load (local.get $pb)))
      (local.set $b1 (v128.load offset=16 (local.get $pb)))
      (local.set $x (v128.load32_splat (local.get $pa)))
      (local.set $c00 (f32x4.add (local.get $c00) (f32x4.mul (local.get $x) (local.get $b0))))
      (local.set $c01 (f32x4.add (local.get $c01) (f32x4.mul (local.get $x) (local.get $b1))))
      (local.set $x (v128.load32_splat (local.get $pa1)))
      (local.set $c10 (f32x4.add (local.get $c10) (f32x4.mul (local.get $x) (local.get $b0))))
      (local.set $c11 (f32x4.add (local.get $c11) (f32x4.mul (local.get $x) (local.get $b1))))
      (local.set $x (v128.load32_splat (local.get $pa2)))
      (local.set $c20 (f32x4.add (local.get $c20) (f32x4.mul (local.get $x) (local.get $b0))))
      (local.set $c21 (f32x4.add (local.get $c21) (f32x4.mul (local.get $x) (local.get $b1))))
      (local.set $x (v128.load32_splat (local.get $pa3)))
      (local.set $c30 (f32x4.add (local.get $c30) (f32x4.mul (local.get $x) (local.get $b0))))
      (local.set $c31 (f32x4.add (local.get $c31) (f32x4.mul (local.get $x) (local.get $b1))))
      (local.set $pa (i32.add (local.get $pa) (local.get $sal)))
      (local.set $pa1 (i32.add (local.get $pa1) (local.get $sal)))
      (local.set $pa2 (i32.add (local.get $pa2) (local.get $sal)))
      (local.set $pa3 (i32.add (local.get $pa3) (local.get $sal)))
      (local.set $pb (i32.add (local.get $pb) (i32.const 32)))
      (br_if $depths (local.tee $depth (i32.sub (local.get $depth) (i32.const 1)))))
    (v128.store (local.get $pc) (local.get $c00))
    (v128.store offset=16 (local.get $pc) (local.get $c01))
    (v128.store (local.get $pc1) (local.get $c10))
    (v128.store offset=16 (local.get $pc1) (local.get $c11))
    (v128.store (local.get $pc2) (local.get $c20))
    (v128.store offset=16 (local.get $pc2) (local.get $c21))
    (v128.store (local.get $pc3) (local.get $c30))
    (v128.store offset=16 (local.get $pc3) (local.get $c31)))

  ;; One row of 8 of C at pc, as $tile4 does four.
  (func $tile1
    (param $pa i32) (param $pb i32) (param $pc i32) (param $depth i32) (param $sal i32)
    (param $add i32)
    (local $x v128) (local $c0 v128) (local $c1 v128)
    (if (local.get $add)
      (then
        (local.set $c0 (v128.load (local.get $pc)))
        (local.set $c1 (v128.load offset=16 (local.get $pc)))))
    (loop $depths
      (local.set $x (v128.load32_splat (local.get $pa)))
      (local.set $c0 (f32x4.add (local.get $c0) (f32x4.mul (local.get $x) (v128.load (local.get $pb)))))
      (local.set $c1
        (f32x4.add (local.get $c1) (f32x4.mul (local.get $x) (v128.load offset=16 (local.get $pb)))))
      (local.set $pa (i32.add (local.get $pa) (local.get $sal)))
      (local.set $pb (i32.add (local.get $pb) (i32.const 32)))
      (br_if $depths (local.tee $depth (i32.sub (local.get $depth) (i32.const 1)))))
    (v128.store (local.get $pc) (local.get $c0))
    (v128.store offset=16 (local.get $pc) (local.get $c1)))

  ;; One step of SGD with momentum (PyTorch's: weight decay added to the gradient) over `count`
  ;; float32 parameters p (count a multiple of 4), gradients g and momentum buffer buf:
  ;; d = g + p * wd; buf' = buf * mu + d; p' = p - (d * kd + buf' * kb) * lr, where (kd, kb) is
  ;; (1, mu) for Nesterov's momentum and (0, 1) for the plain one: the op-by-op update's
  ;; operations in its order (optimizer.ts), without fused multiply-adds.
  (func (export "sgd_step")
    (param $p i32) (param $g i32) (param $buf i32) (param $pOut i32) (param $bufOut i32)
    (param $count i32) (param $lr f32) (param $mu f32) (param $wd f32) (param $kd f32) (param $kb f32)
    (local $o i32) (local $end i32) (local $x v128) (local $d v128) (local $b v128)
    (local.set $end (i32.shl (local.get $count) (i32.const 2)))
    (block $done
      (loop $values
        (br_if $done (i32.ge_u (local.get $o) (local.get $end)))
        (local.set $x (v128.load (i32.add (local.get $p) (local.get $o))))
        (local.set $d
          (f32x4.add
            (v128.load (i32.add (local.get $g) (local.get $o)))
            (f32x4.mul (local.get $x) (f32x4.splat (local.get $wd)))))
        (local.set $b
          (f32x4.add
            (f32x4.mul (v128.load (i32.add (local.get $buf) (local.get $o))) (f32x4.splat (local.get $mu)))
            (local.get $d)))
        (v128.store (i32.add (local.get $bufOut) (local.get $o)) (local.get $b))
        (v128.store (i32.add (local.get $pOut) (local.get $o))
          (f32x4.sub (local.get $x)
            (f32x4.mul
              (f32x4.add
                (f32x4.mul (local.get $d) (f32x4.splat (local.get $kd)))
                (f32x4.mul (local.get $b) (f32x4.splat (local.get $kb))))
              (f32x4.splat (local.get $lr)))))
        (local.set $o (i32.add (local.get $o) (i32.const 16)))
        (br $values))))
)
