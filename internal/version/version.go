// Package version says which build of the project a binary is: its module
// version, the commit it was built from and the Go release, as the Go
// toolchain recorded them in the binary.
package version

import (
	"fmt"
	"runtime/debug"
	"strings"
)

// String returns the version line of the command cmd, such as
// "overlayd v0.3.0 (commit 1c39631a2b4e, 2026-12-02T21:40:00Z) go1.26.8",
// with "(devel)" for a build outside a tagged module and "modified" for
// one from a work tree with uncommitted changes.
func String(cmd string) string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return cmd + " (no build information)"
	}
	return line(cmd, bi)
}

func line(cmd string, bi *debug.BuildInfo) string {
	v := bi.Main.Version
	if v == "" {
		v = "(devel)"
	}
	var rev, at string
	modified := false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.time":
			at = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	var details []string
	if rev != "" {
		details = append(details, "commit "+rev[:min(12, len(rev))])
	}
	if at != "" {
		details = append(details, at)
	}
	if modified {
		details = append(details, "modified")
	}
	out := cmd + " " + v
	if len(details) > 0 {
		out += " (" + strings.Join(details, ", ") + ")"
	}
	return fmt.Sprintf("%s %s", out, bi.GoVersion)
}
