#!/usr/bin/env bash
# render-demo.sh: demo renderer command for the reference worker
# (`video-batch-api worker`).
#
# The worker runs this once per claimed item with the environment
#   ITEM_ID, BATCH_ID, PROMPT, PARAMS_JSON, ATTEMPT
# and the item JSON on standard input. The LAST line of standard output is the
# result URL; everything else (progress, ffmpeg messages) goes to stderr.
#
# With ffmpeg installed it renders a short 320x180 test-pattern video
# (duration = PARAMS_JSON .duration_s, default 2, capped at 10 seconds) with the
# prompt drawn on it when ffmpeg has the drawtext filter, into
#   ${RENDER_OUT_DIR:-/tmp/video-batch-renders}/<ITEM_ID>.mp4
# and prints file://<path>. Without ffmpeg it writes a placeholder <ITEM_ID>.txt
# holding the prompt instead and prints file://<path> of that.
#
# A PROMPT containing FAIL_ME makes it exit 3 (to exercise worker failures).
#
# Manual run:
#   ITEM_ID=demo-1 PROMPT='a red fox at dawn' PARAMS_JSON='{"duration_s":3}' \
#     scripts/render-demo.sh </dev/null

set -euo pipefail

log() {
  echo "render-demo: $*" >&2
}

# The item JSON arrives on stdin; read it (bounded, in case stdin is left open)
# so the worker never blocks writing to us. It fills in missing variables.
ITEM_JSON=""
if [[ ! -t 0 ]]; then
  if command -v timeout >/dev/null 2>&1; then
    ITEM_JSON="$(timeout 5 cat 2>/dev/null || true)"
  else
    ITEM_JSON="$(cat 2>/dev/null || true)"
  fi
fi

from_item() {
  [[ -n "$ITEM_JSON" ]] && command -v jq >/dev/null 2>&1 || return 0
  printf '%s' "$ITEM_JSON" | jq -r "$1 // empty" 2>/dev/null || true
}

ITEM_ID="${ITEM_ID:-$(from_item .item_id)}"
BATCH_ID="${BATCH_ID:-$(from_item .batch_id)}"
PROMPT="${PROMPT-$(from_item .prompt)}"
PARAMS_JSON="${PARAMS_JSON:-$(from_item '.params | tojson')}"
[[ -n "$PARAMS_JSON" ]] || PARAMS_JSON='{}'
ATTEMPT="${ATTEMPT:-$(from_item .attempt)}"

if [[ -z "$ITEM_ID" ]]; then
  log "ITEM_ID is not set (and no item_id on stdin)"
  exit 2
fi

log "item=$ITEM_ID batch=${BATCH_ID:-?} attempt=${ATTEMPT:-?}"

if [[ "$PROMPT" == *FAIL_ME* ]]; then
  log "prompt contains FAIL_ME: failing on purpose (exit 3)"
  exit 3
fi

# File name from the item id, reduced to safe characters.
safe_id="$(printf '%s' "$ITEM_ID" | tr -c 'A-Za-z0-9._-' '_')"
safe_id="$(printf '%s' "$safe_id" | sed 's/^[.]*//')"
[[ -n "$safe_id" ]] || safe_id="item"

out_dir="${RENDER_OUT_DIR:-/tmp/video-batch-renders}"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd -P)"

# Duration: PARAMS_JSON .duration_s, default 2, capped at 10 (and > 0).
raw_duration=""
if command -v jq >/dev/null 2>&1; then
  raw_duration="$(printf '%s' "$PARAMS_JSON" | jq -r '.duration_s // empty | numbers' 2>/dev/null || true)"
else
  raw_duration="$(printf '%s' "$PARAMS_JSON" |
    sed -n 's/.*"duration_s"[[:space:]]*:[[:space:]]*\([0-9][0-9.]*\).*/\1/p' | awk 'NR == 1')"
fi
duration="$(awk -v d="$raw_duration" 'BEGIN {
  if (d !~ /^[0-9]+([.][0-9]+)?$/ || d + 0 <= 0) d = 2
  if (d + 0 > 10) d = 10
  print d + 0
}')"

write_placeholder() {
  local path="$out_dir/$safe_id.txt"
  {
    echo "placeholder render (ffmpeg not available)"
    echo "item_id: $ITEM_ID"
    echo "batch_id: ${BATCH_ID:-}"
    echo "attempt: ${ATTEMPT:-}"
    echo "duration_s: $duration"
    echo "params: $PARAMS_JSON"
    echo "prompt: $PROMPT"
  } >"$path.tmp"
  mv -f "$path.tmp" "$path"
  echo "file://$path"
}

if ! command -v ffmpeg >/dev/null 2>&1; then
  log "ffmpeg not installed: writing a placeholder text file instead of a video"
  write_placeholder
  exit 0
fi

out="$out_dir/$safe_id.mp4"
tmp_out="$out_dir/.$safe_id.$$.mp4"
# Under /tmp, not $TMPDIR: its path goes unquoted into an ffmpeg filter.
work_dir="$(mktemp -d /tmp/render-demo.XXXXXX)"
trap 'rm -rf "$work_dir"; rm -f "$tmp_out"' EXIT

source_filter="testsrc=size=320x180:rate=25:duration=$duration"

# The prompt reaches drawtext through a file (textfile=, expansion=none), so it
# needs no escaping at all; file paths are used only when they hold no
# character that is special in a filter graph.
safe_filter_path() {
  [[ "$1" =~ ^[A-Za-z0-9._/+-]+$ ]]
}

text_filter=""
ffmpeg_filters="$(ffmpeg -hide_banner -filters 2>/dev/null || true)"
if grep -qE '[[:space:]]drawtext[[:space:]]' <<<"$ffmpeg_filters" && safe_filter_path "$work_dir"; then
  text_file="$work_dir/prompt.txt"
  # Wrap at 36 columns, at most 5 lines, so it fits a 320x180 frame.
  wrapped="$(printf '%s\n' "${PROMPT:-(empty prompt)}" | tr -d '\r' | tr '\n\t' '  ' |
    fold -s -w 36 | awk 'NR <= 5')"
  printf '%s' "$wrapped" >"$text_file"
  font_opt=""
  font_path=""
  if command -v fc-match >/dev/null 2>&1; then
    font_path="$(fc-match -f '%{file}' 'DejaVu Sans' 2>/dev/null || true)"
  fi
  if [[ -z "$font_path" || ! -f "$font_path" ]]; then
    for f in /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf /usr/share/fonts/dejavu/DejaVuSans.ttf \
      /usr/share/fonts/TTF/DejaVuSans.ttf /System/Library/Fonts/Supplemental/Arial.ttf; do
      if [[ -f "$f" ]]; then
        font_path="$f"
        break
      fi
    done
  fi
  if [[ -n "$font_path" && -f "$font_path" ]] && safe_filter_path "$font_path"; then
    font_opt=":fontfile=$font_path"
  fi
  text_filter="drawtext=textfile=${text_file}${font_opt}:fontsize=14:fontcolor=white:box=1:boxcolor=black@0.6:boxborderw=6:line_spacing=4:x=(w-text_w)/2:y=h-text_h-12:expansion=none"
else
  log "ffmpeg has no drawtext filter (or the temp path is unusable in a filter): rendering without the prompt text"
fi

render() {
  local vf="$1"
  local args=(-hide_banner -loglevel error -nostdin -y -f lavfi -i "$source_filter")
  if [[ -n "$vf" ]]; then
    args+=(-vf "$vf,format=yuv420p")
  else
    args+=(-vf "format=yuv420p")
  fi
  args+=(-t "$duration" -an -threads 1 -movflags +faststart -f mp4 "$tmp_out")
  # ffmpeg must not write to our stdout: its last line is the result URL.
  ffmpeg "${args[@]}" </dev/null >&2
}

log "rendering ${duration}s 320x180 video to $out"
if [[ -n "$text_filter" ]] && render "$text_filter"; then
  :
else
  [[ -n "$text_filter" ]] && log "rendering with drawtext failed: retrying without the prompt text"
  if ! render ""; then
    log "ffmpeg failed to render $out"
    exit 4
  fi
fi

mv -f "$tmp_out" "$out"
echo "file://$out"
