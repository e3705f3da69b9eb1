package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// unitPath is the systemd unit shipped with the repository.
const unitPath = "../../deploy/systemd/overlayd.service"

// unitSettings returns the Key=Value lines of the unit, in order.
func unitSettings(t *testing.T) [][2]string {
	t.Helper()
	f, err := os.Open(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out [][2]string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if k, v, ok := strings.Cut(l, "="); ok && !strings.HasPrefix(l, "#") {
			out = append(out, [2]string{k, v})
		}
	}
	return out
}

// TestSystemdUnit: the unit is what overlayd's notifications need
// (Type=notify, a watchdog, a restart on failure), systemd-analyze
// verifies it, and docs/operations.md explains every setting of it.
func TestSystemdUnit(t *testing.T) {
	settings := unitSettings(t)
	has := map[string]string{}
	for _, kv := range settings {
		has[kv[0]] = kv[1]
	}
	for k, v := range map[string]string{"Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "WatchdogSec": "60s", "CapabilityBoundingSet": "CAP_NET_ADMIN CAP_NET_RAW"} {
		if has[k] != v {
			t.Errorf("%s=%q; want %q", k, has[k], v)
		}
	}
	// ProtectKernelTunables would make /proc/sys read-only, and overlayd
	// turns on IPv4 forwarding there.
	if _, ok := has["ProtectKernelTunables"]; ok {
		t.Error("ProtectKernelTunables is set: overlayd could not enable net.ipv4.ip_forward")
	}

	doc, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range settings {
		if kv[0] == "Description" || kv[0] == "Documentation" {
			continue
		}
		if !regexp.MustCompile("`" + regexp.QuoteMeta(kv[0]) + "=").Match(doc) {
			t.Errorf("docs/operations.md does not explain %s=", kv[0])
		}
	}

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("skipping systemd-analyze verify: no systemd-analyze (Debian's systemd package)")
	}
	// verify wants ExecStart's binary to exist: this test's own stands in.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	unit, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	tmp := filepath.Join(dir, "overlayd.service")
	if err := os.WriteFile(tmp, []byte(strings.Replace(string(unit), "ExecStart=/usr/local/bin/overlayd", "ExecStart="+self, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(analyze, "verify", "--man=no", tmp).CombinedOutput(); err != nil || len(out) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
