#!/usr/bin/env bash
# Same seeds and settings, two builds of `l2s`: are the outputs byte for byte the same?
#
#   tools/bench/same_images.sh BEFORE_BIN AFTER_BIN OUTDIR
#
# Runs the same commands with both binaries (shapes model, the tiny SD 1/2 and FLUX dev/schnell
# fixtures: plain generation, steering, inversion, attention maps, training data) into
# OUTDIR/before/<case> and OUTDIR/after/<case>, compares every file with cmp and prints a table.
# Where the bytes differ, a PNG is also compared by its decoded pixels and its text chunks, a
# safetensors file tensor by tensor (count of differing values, largest difference) and by its
# metadata as a map (the order of the header's metadata keys changes from run to run of one
# binary, so its bytes differ even when the content is the same), a JSON file key by key; stdout
# is compared as a file too, its paths made case-relative. About 10 minutes on two cores.
# Needs only python3 (standard library). Run from anywhere; the fixtures are found from this file.
set -uo pipefail
if [ $# -ne 3 ]; then
    echo "usage: $0 BEFORE_BIN AFTER_BIN OUTDIR" >&2
    exit 2
fi
BEFORE=$(realpath "$1")
AFTER=$(realpath "$2")
OUT=$3
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FIX=$ROOT/fixtures
CLF=$ROOT/crates/shapes-model/weights/shapes-classifier
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
rm -rf "$OUT/before" "$OUT/after" "$OUT/inputs"
mkdir -p "$OUT/before" "$OUT/after" "$OUT/inputs"

# ---- the comparison of one file pair (PNG pixels and text chunks, safetensors tensors) ----
cat >"$OUT/compare.py" <<'PYEOF'
import json, struct, sys, zlib
from array import array

def png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, text, ihdr = 8, b"", {}, None
    while pos < len(data):
        n, = struct.unpack(">I", data[pos:pos + 4]); kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]; pos += 12 + n
        if kind == b"IHDR": ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT": idat += body
        elif kind == b"tEXt":
            k, v = body.split(b"\0", 1); text[k.decode("latin-1")] = v.decode("latin-1")
        elif kind == b"zTXt":
            k, v = body.split(b"\0", 1); text[k.decode("latin-1")] = zlib.decompress(v[1:]).decode("latin-1")
        elif kind == b"iTXt":
            k, rest = body.split(b"\0", 1); comp = rest[0]; rest = rest[2:]
            _lang, rest = rest.split(b"\0", 1); _tk, v = rest.split(b"\0", 1)
            text[k.decode("utf-8")] = (zlib.decompress(v) if comp else v).decode("utf-8")
    w, h, depth, color, _c, _f, interlace = ihdr
    assert interlace == 0, "interlaced PNG"
    chans = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    bpp = max(1, chans * depth // 8); stride = (w * chans * depth + 7) // 8
    raw = zlib.decompress(idat); out = bytearray(); prev = bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]; line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0; b = prev[i]; c = prev[i - bpp] if i >= bpp else 0
            if f == 1: line[i] = (line[i] + a) & 255
            elif f == 2: line[i] = (line[i] + b) & 255
            elif f == 3: line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line; prev = line
    return (w, h, depth, color), bytes(out), text

def st(path):
    data = open(path, "rb").read()
    n, = struct.unpack("<Q", data[:8]); head = json.loads(data[8:8 + n]); base = 8 + n
    meta = head.pop("__metadata__", {})
    return meta, {k: (v["dtype"], v["shape"], data[base + v["data_offsets"][0]:base + v["data_offsets"][1]]) for k, v in head.items()}

def values(dtype, b):
    if dtype == "F32": return array("f", b)
    if dtype == "F64": return array("d", b)
    if dtype == "F16":
        return [struct.unpack("<e", b[i:i + 2])[0] for i in range(0, len(b), 2)]
    if dtype == "BF16":
        return [struct.unpack("<f", b"\0\0" + b[i:i + 2])[0] for i in range(0, len(b), 2)]
    return array("B", b)

a, b = sys.argv[1], sys.argv[2]
notes, same_content = [], False
if a.endswith(".png"):
    (fa, pa, ta), (fb, pb, tb) = png(a), png(b)
    if fa != fb: notes.append(f"format {fa} vs {fb}")
    elif pa == pb: notes.append(f"pixels identical ({len(pa)} bytes)"); same_content = True
    else:
        d = [abs(x - y) for x, y in zip(pa, pb) if x != y]
        notes.append(f"PIXELS DIFFER: {len(d)} of {len(pa)} values, max |diff| {max(d)}")
    for k in sorted(set(ta) | set(tb)):
        if ta.get(k) != tb.get(k): notes.append(f"text {k!r}: {ta.get(k)!r} -> {tb.get(k)!r}")
elif a.endswith(".safetensors"):
    (ma, ta), (mb, tb) = st(a), st(b)
    if ma != mb:
        for k in sorted(set(ma) | set(mb)):
            if ma.get(k) != mb.get(k): notes.append(f"metadata {k!r}: {ma.get(k)!r} -> {mb.get(k)!r}")
    if set(ta) != set(tb):
        ob, oa = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
        notes.append(f"{len(ob)} tensors only before {ob[:2]}, {len(oa)} only after {oa[:2]}")
    same, common = 0, sorted(set(ta) & set(tb))
    for k in common:
        (da, sa, ba), (db, sb, bb) = ta[k], tb[k]
        if (da, sa) != (db, sb): notes.append(f"{k}: {da}{sa} vs {db}{sb}"); continue
        if ba == bb: same += 1; continue
        va, vb = values(da, ba), values(db, bb)
        d = [abs(x - y) for x, y in zip(va, vb) if x != y]
        notes.append(f"TENSOR {k} DIFFERS: {len(d)} of {len(va)} values, max |diff| {max(d):.3g}")
    notes.append(f"{same} of {len(common)} common tensors identical")
    if ma == mb and set(ta) == set(tb) and same == len(common):
        same_content = True
        notes.append("same tensors and metadata, only the header's key order differs")
elif a.endswith(".json"):
    ja, jb = json.load(open(a)), json.load(open(b))
    if isinstance(ja, dict) and isinstance(jb, dict):
        changed = [k for k in ja if k in jb and ja[k] != jb[k]]
        gone, added = [k for k in ja if k not in jb], [k for k in jb if k not in ja]
        notes += [f"{k!r}: {ja[k]!r} -> {jb[k]!r}" for k in changed]
        notes += [f"key {k!r} only before" for k in gone] + [f"key {k!r} added: {jb[k]!r}" for k in added]
        same_content = not changed and not gone  # a key the new build adds changes no value
    else:
        same_content = ja == jb
else:
    la, lb = open(a, errors="replace").read().splitlines(), open(b, errors="replace").read().splitlines()
    notes += [f"{x!r} -> {y!r}" for x, y in zip(la, lb) if x != y][:3]
    if len(la) != len(lb): notes.append(f"{len(la)} vs {len(lb)} lines")
print(("SAME " if same_content else "DIFF ") + "; ".join(notes))
PYEOF

# ---- running one case with both binaries ----
ROWS=()
DETAILS=()
# pair NAME "BEFORE ARGS" "AFTER ARGS": the args may name the case's folder as $D.
pair() {
    local name=$1 args_before=$2 args_after=$3 which bin args D status
    for which in before after; do
        if [ $which = before ]; then bin=$BEFORE; args=$args_before; else bin=$AFTER; args=$args_after; fi
        D=$OUT/$which/$name
        mkdir -p "$D"
        eval "set -- $args"
        # stdout goes into the case's folder only afterwards: some commands want an empty one.
        if ! "$bin" "$@" >"$OUT/$which/$name.stdout" 2>"$OUT/$which/$name.stderr"; then
            ROWS+=("| $name | FAILED ($which: see $OUT/$which/$name.stderr) | | |")
            return
        fi
        mv "$OUT/$which/$name.stdout" "$D/stdout.txt"
        sed -i "s|$D|CASE|g" "$D/stdout.txt"  # the printed paths name the case's own folder
    done
    local bytes=yes content=yes f rel files=0 verdict
    while IFS= read -r f; do
        rel=${f#"$OUT/before/$name/"}
        files=$((files + 1))
        if [ ! -f "$OUT/after/$name/$rel" ]; then
            bytes=no; content=no; DETAILS+=("$name/$rel: missing after"); continue
        fi
        if ! cmp -s "$f" "$OUT/after/$name/$rel"; then
            bytes=no
            verdict=$("$PY" "$OUT/compare.py" "$f" "$OUT/after/$name/$rel")
            [ "${verdict%% *}" = SAME ] || content=no
            DETAILS+=("$name/$rel: bytes differ; ${verdict#* }")
        fi
    done < <(find "$OUT/before/$name" -type f | sort)
    while IFS= read -r f; do
        rel=${f#"$OUT/after/$name/"}
        [ -f "$OUT/before/$name/$rel" ] || { bytes=no; content=no; DETAILS+=("$name/$rel: missing before"); }
    done < <(find "$OUT/after/$name" -type f | sort)
    ROWS+=("| $name | $bytes | $content | $files |")
    echo "$name: bytes $bytes, content $content" >&2
}
same() { pair "$1" "$2" "$2"; }

# ---- the cases ----
P="a diamond left of a triangle"
STEER="--steer-steps 10 --steer-iterations 3 --step-size 0.1 --normalized --stop-below 0.1"
same shapes-plain "generate -q --prompt '$P' --steps 20 --num-images 4 --out \$D"
same shapes-centroid "generate -q --prompt '$P' --steps 20 --num-images 4 --steer centroid --out \$D"
same shapes-attend-excite "generate -q --prompt '$P' --steps 20 --num-images 4 --steer attend-excite --out \$D"
same shapes-l2s-classifier "generate -q --prompt '$P' --steps 20 --num-images 4 --steer $CLF $STEER --out \$D"
# The after build's keyword for the same classifier and schedule (steering.json beside it).
if "$AFTER" generate --help | grep -q 'l2s (Learn-to-Steer'; then
    pair shapes-l2s-keyword "generate -q --prompt '$P' --steps 20 --num-images 4 --steer $CLF $STEER --out \$D" \
        "generate -q --prompt '$P' --steps 20 --num-images 4 --steer l2s --out \$D"
fi
"$BEFORE" generate -q --prompt "$P" --steps 20 --out "$OUT/inputs/shapes.png"
same shapes-invert "invert -q --image $OUT/inputs/shapes.png --prompt '$P' --steps 20 --out \$D/rec.png --save-latents \$D/latents.safetensors"
same shapes-attention "attention -q --prompt '$P' --words diamond,triangle --steps 20 --out \$D/sheet.png --maps \$D/maps.safetensors"
# The same with the recorded steps named (the default of --at-steps may differ between builds).
same shapes-attention-at-steps "attention -q --prompt '$P' --words diamond,triangle --steps 20 --at-steps 2,4,5,6,8,10,15,19 --out \$D/sheet.png --maps \$D/maps.safetensors"
# Dual-inversion training data from a few rendered two-object scenes (maps, labels, PSNR, manifest).
"$BEFORE" shapes render -q --count 6 --seed 1000 --min-objects 2 --max-objects 2 --out "$OUT/inputs/render32" >/dev/null
"$BEFORE" shapes render -q --count 3 --seed 1000 --size 64 --min-objects 2 --max-objects 2 --out "$OUT/inputs/render64" >/dev/null
same shapes-data-build "data build -q --images $OUT/inputs/render32 --out \$D --steps 20 --fixed-point 0 --min-psnr 10 --check-relation shapes --workers 2"

Q="a dog to the right of a bear"
for m in sd1 sd2 flux-dev flux-schnell; do
    M=$FIX/$m-tiny/model
    case $m in flux-schnell) S="" ;; *) S="--steps 6" ;; esac
    same $m-plain "generate -q --model $M --prompt '$Q' $S --num-images 4 --out \$D"
    same $m-centroid "generate -q --model $M --prompt '$Q' $S --num-images 4 --steer centroid --out \$D"
    "$BEFORE" generate -q --model "$M" --prompt "$Q" $S --out "$OUT/inputs/$m.png"
    same $m-invert "invert -q --model $M --image $OUT/inputs/$m.png --prompt '$Q' $S --out \$D/rec.png --save-latents \$D/latents.safetensors"
    same $m-attention "attention -q --model $M --prompt '$Q' --words dog,bear $S --out \$D/sheet.png --maps \$D/maps.safetensors"
    case $m in sd1) R=render32 ;; flux*) R=render64 ;; *) R="" ;; esac
    [ -n "$R" ] && same $m-data-build "data build -q --model $M --images $OUT/inputs/$R --out \$D $S --min-psnr 0 --workers 2"
    case $m in sd*) same $m-attention-at-steps "attention -q --model $M --prompt '$Q' --words dog,bear $S --at-steps 1,2,3,5 --out \$D/sheet.png --maps \$D/maps.safetensors" ;; esac
done

echo
echo "before: $BEFORE"
echo "after:  $AFTER"
echo
echo "| case | bytes identical | pixels / tensors identical | files |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
if [ ${#DETAILS[@]} -gt 0 ]; then
    echo
    echo "Differences:"
    printf -- '- %s\n' "${DETAILS[@]}"
fi
