#!/usr/bin/env bash
# Builds the Kotlin client with Debian's Kotlin and OkHttp 3.13 (packages
# kotlin, libokhttp-java, libokio-java), and checks that it is usable as
# documented:
#   OUT/wsgw-client.jar          the library
#   OUT/wsgw-client-tests.jar    the torture run (tests/tests/kotlin_client.rs
#                                drives it) and the README's Kotlin example,
#                                compiled against the library jar alone
#   OUT/java-usage/              a Java caller, compiled with javac
# Usage: build.sh OUT (default: target/kotlin). Rebuilds only what is older
# than its sources. Prints the classpath to run the tests with.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="${1:-$root/target/kotlin}"
mkdir -p "$out"

jars=/usr/share/java
deps="$jars/okhttp.jar:$jars/okio.jar"
for f in "$jars/okhttp.jar" "$jars/okio.jar" "$jars/kotlin-stdlib.jar"; do
  if [ ! -f "$f" ] || ! command -v kotlinc >/dev/null; then
    echo "build.sh: $f or kotlinc is missing; install Debian's packages:" >&2
    echo "  apt-get install -y kotlin libokhttp-java libokio-java" >&2
    exit 2
  fi
done

# newer TARGET SOURCES...: true if TARGET is missing or a source is newer.
stale() {
  local target="$1"; shift
  [ ! -e "$target" ] && return 0
  [ -n "$(find "$@" -newer "$target" -type f -print -quit)" ]
}

kotlinc_quiet() {
  # kotlinc 1.3 on a recent JDK warns about -Xverify:none on every run.
  nice -n 19 kotlinc "$@" 2> >(grep -v 'Xverify:none' >&2)
}

lib="$out/wsgw-client.jar"
if stale "$lib" "$here/src/main" "$0"; then
  echo "build.sh: compiling the library" >&2
  kotlinc_quiet -Werror "$here/src/main/kotlin" -cp "$deps" -d "$lib.tmp.jar"
  mv "$lib.tmp.jar" "$lib"
fi

# The README's Kotlin example, as a file, exactly as printed there: the
# first ```kotlin block of the "Mobile client guide" section.
example="$out/readme-example/Example.kt"
mkdir -p "$(dirname "$example")"
awk '
  /^## / { in_guide = ($0 ~ /^## Mobile client guide/) }
  in_guide && /^```kotlin$/ && !done { grab = 1; next }
  grab && /^```$/ { grab = 0; done = 1 }
  grab { print }
' "$root/README.md" > "$example.new"
if [ ! -s "$example.new" ]; then
  echo "build.sh: no \`\`\`kotlin block in the README's Mobile client guide" >&2
  exit 1
fi
if ! cmp -s "$example.new" "$example"; then mv "$example.new" "$example"; else rm "$example.new"; fi

tests="$out/wsgw-client-tests.jar"
if stale "$tests" "$here/src/test/kotlin" "$example" "$lib" "$0"; then
  echo "build.sh: compiling the torture run and the README's example" >&2
  kotlinc_quiet "$here/src/test/kotlin" "$example" -cp "$lib:$deps" -d "$tests.tmp.jar"
  mv "$tests.tmp.jar" "$tests"
fi

java_out="$out/java-usage"
if stale "$java_out/done" "$here/src/test/java" "$lib" "$0"; then
  echo "build.sh: compiling the Java caller" >&2
  rm -rf "$java_out" && mkdir -p "$java_out"
  nice -n 19 javac -Xlint:all -Werror -d "$java_out" -cp "$lib:$deps:$jars/kotlin-stdlib.jar" \
    $(find "$here/src/test/java" -name '*.java')
  touch "$java_out/done"
fi

echo "$tests:$lib:$deps:$jars/kotlin-stdlib.jar"
