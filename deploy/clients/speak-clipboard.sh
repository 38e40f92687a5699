#!/usr/bin/env bash
# Screen-reader helper (NVDA via WSL/Git Bash, Orca on Linux): send the clipboard image (or a file) to rpiq,
# print the answer as plain text (the screen reader reads the terminal) and play the server's speech.
#
#   speak-clipboard.sh                     # read the text in the clipboard image
#   speak-clipboard.sh photo.jpg           # read the text in a file
#   speak-clipboard.sh -a "What colour is it?" [photo.jpg]   # ask a question instead
#   speak-clipboard.sh -d [photo.jpg]      # describe
#
# Environment: RPIQ_URL (default http://127.0.0.1:8000), RPIQ_API_KEY, RPIQ_PLAYER (a command, or "none").
# Needs curl; the clipboard needs wl-paste (Wayland) or xclip (X11); plays with paplay, aplay or ffplay.
set -euo pipefail

url=${RPIQ_URL:-http://127.0.0.1:8000}
endpoint=/v1/read
question=""
while getopts "a:dh" opt; do
  case $opt in
    a) endpoint=/v1/vqa; question=$OPTARG ;;
    d) endpoint=/v1/vqa; question="Describe this photo." ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT   # the photo and the speech never outlive the call

if [ $# -ge 1 ]; then
  image=$1
  [ -r "$image" ] || { echo "Cannot read the file $image." >&2; exit 1; }
else
  image=$work/clipboard.png
  if command -v wl-paste >/dev/null && wl-paste --type image/png >"$image" 2>/dev/null && [ -s "$image" ]; then :
  elif command -v xclip >/dev/null && xclip -selection clipboard -t image/png -o >"$image" 2>/dev/null && [ -s "$image" ]; then :
  else
    echo "No image in the clipboard (needs wl-paste or xclip). Give a photo file instead." >&2
    exit 1
  fi
fi

args=(-sS --max-time 180 -F "image=@$image" -H "Accept: audio/wav" -D "$work/headers" -o "$work/answer.wav"
      -w '%{http_code}')
[ -n "${RPIQ_API_KEY:-}" ] && args+=(-H "Authorization: Bearer $RPIQ_API_KEY")
[ -n "$question" ] && args+=(-F "question=$question")
status=$(curl "${args[@]}" "$url$endpoint") || { echo "Cannot reach the server at $url." >&2; exit 1; }
if [ "$status" != 200 ]; then
  echo "The server answered $status: $(cat "$work/answer.wav")" >&2
  exit 1
fi

# The answer text comes percent-encoded in the X-Rpiq-Text header (HTTP headers are latin-1 only).
encoded=$(sed -n 's/^[Xx]-[Rr]piq-[Tt]ext: *//p' "$work/headers" | tr -d '\r')
text=$(printf '%b' "${encoded//%/\\x}")
if [ -n "$text" ]; then printf '%s\n' "$text"; else echo "I found no readable text in this photo."; fi

player=${RPIQ_PLAYER:-}
if [ -z "$player" ]; then
  for p in paplay aplay "ffplay -nodisp -autoexit -loglevel quiet"; do
    command -v "${p%% *}" >/dev/null && { player=$p; break; }
  done
fi
if [ -n "$player" ] && [ "$player" != none ]; then
  $player "$work/answer.wav" || echo "Could not play the speech." >&2
fi
