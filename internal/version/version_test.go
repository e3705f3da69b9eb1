package version

import (
	"runtime/debug"
	"strings"
	"testing"
)

func TestLine(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "v0.3.0"}, Settings: []debug.BuildSetting{
		{Key: "vcs.revision", Value: "1c39631a2b4e5f60718293a4b5c6d7e8f9012345"},
		{Key: "vcs.time", Value: "2026-12-02T21:40:00Z"},
		{Key: "vcs.modified", Value: "true"},
	}}
	if got, want := infoOf(bi).Line("overlayd"), "overlayd v0.3.0 (commit 1c39631a2b4e, 2026-12-02T21:40:00Z, modified) go1.26.8"; got != want {
		t.Errorf("line = %q, want %q", got, want)
	}
	if got, want := infoOf(&debug.BuildInfo{GoVersion: "go1.26.8"}).Line("overlayctl"), "overlayctl (devel) go1.26.8"; got != want {
		t.Errorf("line without VCS = %q, want %q", got, want)
	}
	if s := String("overlayd"); !strings.HasPrefix(s, "overlayd ") || !strings.Contains(s, "go1.") {
		t.Errorf("String = %q", s)
	}
}
