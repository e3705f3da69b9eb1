package main

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseFlags(t *testing.T) {
	var stderr bytes.Buffer
	cfg, _, _, err := parseFlags("run", []string{
		"--etcd-endpoints", "https://a:2379, https://b:2379,",
		"--network-cidr", "198.19.0.0/16", "--vni", "42", "--underlay-addr", "198.18.0.7",
	}, &stderr)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(cfg.Etcd.Endpoints, " "); got != "https://a:2379 https://b:2379" {
		t.Errorf("endpoints = %q", got)
	}
	if cfg.Network.VNI != 42 || cfg.Network.CIDR.String() != "198.19.0.0/16" || cfg.UnderlayAddr.String() != "198.18.0.7" {
		t.Errorf("config = %+v", cfg)
	}
}

func TestParseFlagsRejectsBadInput(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--network-cidr", "nonsense"}, "--network-cidr"},
		{[]string{"--network-cidr", "198.19.0.0/28"}, "too small"},
		{[]string{"--vni", "16777216"}, "--vni"},
		{[]string{"--vni", "0"}, "vni"},
		{[]string{"--vxlan-port", "70000"}, "--vxlan-port"},
		{[]string{"--underlay-addr", "2001:db8::1"}, "--underlay-addr"},
		{[]string{"--network", "Bad_Name"}, "name"},
		{[]string{"--log-level", "loud"}, "--log-level"},
		{[]string{"--log-format", "xml"}, "--log-format"},
		{[]string{"--no-such-flag"}, "no-such-flag"},
		{[]string{"--max-blocks", "0"}, "--max-blocks 0: want at least 1"},
		{[]string{"--reclaim-after", "0s"}, "--reclaim-after"},
		{[]string{"--block-idle", "-1s"}, "--block-idle"},
	} {
		var stderr bytes.Buffer
		_, _, _, err := parseFlags("run", tc.args, &stderr)
		if err == nil {
			t.Errorf("%v: accepted", tc.args)
			continue
		}
		if msg := err.Error() + stderr.String(); !strings.Contains(msg, tc.want) {
			t.Errorf("%v: error %q does not mention %q", tc.args, msg, tc.want)
		}
	}
}

func TestRunUsageErrors(t *testing.T) {
	var stderr bytes.Buffer
	if code := run([]string{"frobnicate"}, io.Discard, &stderr); code != 2 || !strings.Contains(stderr.String(), "unknown command") {
		t.Errorf("unknown command: exit %d, %q", code, stderr.String())
	}
	stderr.Reset()
	if code := run([]string{"--vni", "x"}, io.Discard, &stderr); code != 2 {
		t.Errorf("bad flag: exit %d, want 2", code)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--vni", "5", "extra"}, "unexpected"},
		{[]string{"teardown", "extra"}, "unexpected"},
		{[]string{"remove-host"}, "the ID of the host"},
		{[]string{"remove-host", "--etcd-endpoints", "http://127.0.0.1:1", "a", "b"}, "the ID of the host"},
	} {
		stderr.Reset()
		if code := run(tc.args, io.Discard, &stderr); code != 2 || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%q: exit %d, %q; want 2 and %q", tc.args, code, stderr.String(), tc.want)
		}
	}
}

// TestFlagsDocumented: every flag overlayd takes has a row in
// docs/configuration.md.
func TestFlagsDocumented(t *testing.T) {
	var stderr bytes.Buffer
	if _, _, _, err := parseFlags("run", []string{"-h"}, &stderr); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
	checkFlagsDocumented(t, "overlayd", stderr.String(), 20)
}

// checkFlagsDocumented fails the test for each flag of the usage text
// (a flag package's -h output) that has no row in docs/configuration.md,
// and when it finds fewer than least flags, which would mean it read the
// usage text wrong.
func checkFlagsDocumented(t *testing.T, cmd, usage string, least int) {
	t.Helper()
	doc, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(usage, "\n") {
		name, ok := strings.CutPrefix(line, "  -")
		if !ok {
			continue
		}
		name, _, _ = strings.Cut(name, " ")
		n++
		if !bytes.Contains(doc, []byte("| `--"+name+"` |")) {
			t.Errorf("%s flag --%s has no row in docs/configuration.md", cmd, name)
		}
	}
	if n < least {
		t.Fatalf("found only %d flags in the usage text of %s:\n%s", n, cmd, usage)
	}
}

// TestConfigSources: a flag comes from the command line, else its
// OVERLAYD_* environment variable, else the --config file; a bad value
// or an unknown name says where it came from.
func TestConfigSources(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "overlayd.conf")
	if err := os.WriteFile(file, []byte("# overlayd's flags\nvni 11\nvxlan-port 4800\nmetrics-addr 127.0.0.1:9999 # a comment\nmax-blocks 3\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("OVERLAYD_VXLAN_PORT", "4801")
	t.Setenv("OVERLAYD_MAX_BLOCKS", "4")
	cfg, _, _, err := parseFlags("run", []string{"--config", file, "--max-blocks", "5"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Network.VNI != 11 || cfg.MetricsAddr != "127.0.0.1:9999" {
		t.Errorf("from the file: vni %d, metrics-addr %q; want 11, 127.0.0.1:9999", cfg.Network.VNI, cfg.MetricsAddr)
	}
	if cfg.Network.Port != 4801 {
		t.Errorf("vxlan-port %d: want 4801, the environment's over the file's", cfg.Network.Port)
	}
	if cfg.MaxBlocks != 5 {
		t.Errorf("max-blocks %d: want 5, the command line's over the environment's and the file's", cfg.MaxBlocks)
	}
	t.Setenv("OVERLAYD_CONFIG", file)
	t.Setenv("OVERLAYD_VXLAN_PORT", "")
	if cfg, _, _, err := parseFlags("teardown", nil, io.Discard); err != nil || cfg.Network.Port != 4800 {
		t.Errorf("--config from OVERLAYD_CONFIG, for teardown: port %d, %v; want 4800", cfg.Network.Port, err)
	}
	t.Setenv("OVERLAYD_CONFIG", "")

	bad := filepath.Join(dir, "bad.conf")
	for _, tc := range []struct {
		env, file string
		args      []string
		want      []string
	}{
		{file: "vni 11\nfrobnicate yes\n", want: []string{"--config file", `"frobnicate"`}},
		{file: "vni eleven\n", want: []string{"--config file", "eleven", "vni"}},
		{env: "OVERLAYD_VNI=x", want: []string{"environment", "OVERLAYD_VNI", `"x"`}},
		{args: []string{"--config", filepath.Join(dir, "missing.conf")}, want: []string{"missing.conf"}},
	} {
		args := tc.args
		if tc.file != "" {
			if err := os.WriteFile(bad, []byte(tc.file), 0o600); err != nil {
				t.Fatal(err)
			}
			args = []string{"--config", bad}
		}
		if k, v, ok := strings.Cut(tc.env, "="); ok {
			t.Setenv(k, v)
		}
		_, _, _, err := parseFlags("run", args, io.Discard)
		for _, w := range tc.want {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("%+v: error %v; want it to name %s", tc, err, w)
			}
		}
		if k, _, ok := strings.Cut(tc.env, "="); ok {
			t.Setenv(k, "")
		}
	}
}

// TestVersion: --version prints the build's version line and exits 0.
func TestVersion(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"--version"}, &stdout, &stderr); code != 0 || !strings.HasPrefix(stdout.String(), "overlayd ") || !strings.Contains(stdout.String(), "go1.") {
		t.Fatalf("--version: exit %d, %q, %q", code, stdout.String(), stderr.String())
	}
}
