// Package version says which build of the project a binary is: its module
// version, the commit it was built from and the Go release, as the Go
// toolchain recorded them in the binary.
package version

import (
	"fmt"
	"runtime/debug"
	"strings"
)

// Info is what the toolchain recorded about a build.
type Info struct {
	// Version is the module version, "(devel)" for a build outside a
	// tagged module.
	Version string
	// Revision is the commit the binary was built from, "" when unknown.
	Revision string
	// Time is the commit's time (RFC 3339), "" when unknown.
	Time string
	// Modified is true for a build from a work tree with uncommitted
	// changes.
	Modified bool
	// GoVersion is the Go release that built it, such as "go1.26.8".
	GoVersion string
}

// Read returns this binary's build information; a binary built without
// any has Version "(unknown)".
func Read() Info {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return Info{Version: "(unknown)"}
	}
	return infoOf(bi)
}

func infoOf(bi *debug.BuildInfo) Info {
	in := Info{Version: bi.Main.Version, GoVersion: bi.GoVersion}
	if in.Version == "" {
		in.Version = "(devel)"
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			in.Revision = s.Value
		case "vcs.time":
			in.Time = s.Value
		case "vcs.modified":
			in.Modified = s.Value == "true"
		}
	}
	return in
}

// String returns the version line of the command cmd, such as
// "overlayd v0.3.0 (commit 1c39631a2b4e, 2026-12-02T21:40:00Z) go1.26.8",
// with "(devel)" for a build outside a tagged module and "modified" for
// one from a work tree with uncommitted changes.
func String(cmd string) string { return Read().Line(cmd) }

// Line returns the version line of the command cmd built as in describes.
func (in Info) Line(cmd string) string {
	var details []string
	if in.Revision != "" {
		details = append(details, "commit "+in.Revision[:min(12, len(in.Revision))])
	}
	if in.Time != "" {
		details = append(details, in.Time)
	}
	if in.Modified {
		details = append(details, "modified")
	}
	out := cmd + " " + in.Version
	if len(details) > 0 {
		out += " (" + strings.Join(details, ", ") + ")"
	}
	if in.GoVersion == "" {
		return out
	}
	return fmt.Sprintf("%s %s", out, in.GoVersion)
}
