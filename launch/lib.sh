# Helpers shared by the launch scripts (sourced, not run). Pure bash: in --dry-run mode the scripts
# must work with no external program on PATH, so nothing here forks a command.
#
# shellcheck shell=bash
# The sourcing script sets PROG (its name, for messages) and DRY_RUN (0 or 1).

# Empty arrays under `set -u` need bash 4.4 (macOS ships 3.2: brew install bash).
if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4) )); then
  printf '%s: error: bash 4.4 or newer is needed, this is %s\n' "${PROG}" "${BASH_VERSION}" >&2
  exit 1
fi

# fail MESSAGE: a runtime failure (exit 1).
fail() {
  printf '%s: error: %s\n' "${PROG}" "$*" >&2
  exit 1
}

# usage_error MESSAGE: a bad command line (exit 2), with a pointer to --help.
usage_error() {
  printf '%s: error: %s\n' "${PROG}" "$*" >&2
  printf 'Run %s --help for the flags.\n' "${PROG}" >&2
  exit 2
}

# info MESSAGE: progress notes go to stderr, so that stdout holds only the commands in --dry-run.
info() {
  printf '%s: %s\n' "${PROG}" "$*" >&2
}

# require_flag NAME VALUE: usage error naming --NAME when VALUE is empty.
require_flag() {
  if [[ -z "$2" ]]; then
    usage_error "missing required flag --$1"
  fi
}

# require_positive_int NAME VALUE
require_positive_int() {
  require_flag "$1" "$2"
  if [[ ! "$2" =~ ^[1-9][0-9]*$ ]]; then
    usage_error "--$1 must be a positive integer, got '$2'"
  fi
}

# require_repo_config CONFIG REPO_ROOT: CONFIG (FILE or FILE:ARG) must name a repository file by
# a relative path: the jobs run from a copy of the repository (or from its root) elsewhere.
require_repo_config() {
  local file=${1%%:*}
  if [[ "${file}" == /* ]]; then
    usage_error "--config=$1: give the path relative to the repository, e.g. configs/X.py"
  fi
  [[ -f "$2/${file}" ]] || usage_error "--config=$1: $2/${file} not found"
}

# shell_quote WORD: WORD as one bash word: unchanged when it holds only characters bash leaves
# alone, else in single quotes (an embedded ' becomes '\''). A --flag= prefix stays outside the
# quotes for readability: --command='cd x && y'.
shell_quote() {
  local word=$1
  local escaped_quote="'\\''"
  if [[ "${word}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "${word}"
  elif [[ "${word}" =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    shell_quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${word//\'/${escaped_quote}}"
  fi
}

# join_quoted WORD...: the words quoted and joined by spaces (a command line bash parses back into
# exactly these words).
join_quoted() {
  local line='' word
  for word in "$@"; do
    line+="${line:+ }$(shell_quote "${word}")"
  done
  printf '%s' "${line}"
}

# run_cmd COMMAND ARGS...: in --dry-run print the command (one line, quoted) to stdout; else echo
# it to stderr and run it.
run_cmd() {
  if (( DRY_RUN )); then
    printf '%s\n' "$(join_quoted "$@")"
  else
    info "+ $(join_quoted "$@")"
    "$@"
  fi
}
