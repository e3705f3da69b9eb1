package main

import (
	"bytes"
	"errors"
	"flag"
	"os"
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
	if code := run([]string{"frobnicate"}, &stderr); code != 2 || !strings.Contains(stderr.String(), "unknown command") {
		t.Errorf("unknown command: exit %d, %q", code, stderr.String())
	}
	stderr.Reset()
	if code := run([]string{"--vni", "x"}, &stderr); code != 2 {
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
		if code := run(tc.args, &stderr); code != 2 || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%q: exit %d, %q; want 2 and %q", tc.args, code, stderr.String(), tc.want)
		}
	}
}

// TestFlagsDocumented: every flag overlayd takes has a row in
// docs/configuration.md.
func TestFlagsDocumented(t *testing.T) {
	doc, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	if _, _, _, err := parseFlags("run", []string{"-h"}, &stderr); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
	n := 0
	for _, line := range strings.Split(stderr.String(), "\n") {
		name, ok := strings.CutPrefix(line, "  -")
		if !ok {
			continue
		}
		name, _, _ = strings.Cut(name, " ")
		n++
		if !bytes.Contains(doc, []byte("| `--"+name+"` |")) {
			t.Errorf("flag --%s has no row in docs/configuration.md", name)
		}
	}
	if n < 20 {
		t.Fatalf("found only %d flags in the usage text:\n%s", n, stderr.String())
	}
}
