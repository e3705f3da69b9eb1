package main

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

// TestInstallFlagsDocumented: every flag of install-cni has a row in
// docs/configuration.md.
func TestInstallFlagsDocumented(t *testing.T) {
	var stderr bytes.Buffer
	if _, err := parseInstall([]string{"-h"}, &stderr); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
	checkFlagsDocumented(t, "install-cni", stderr.String(), 7)
}

// TestInstallCNI: install-cni puts the plugin and a configuration list a
// runtime loads into the two directories, replaces them when run again,
// leaves no temporary file behind, and fails with a message that names
// the flag when a directory cannot be written or the plugin is missing.
func TestInstallCNI(t *testing.T) {
	dir := t.TempDir()
	plugin := filepath.Join(dir, "overlay-cni")
	if err := os.WriteFile(plugin, []byte("#!/bin/sh\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	bin, conf := filepath.Join(dir, "bin"), filepath.Join(dir, "net.d")
	install := func(extra ...string) (int, string, string) {
		var out, errb bytes.Buffer
		args := append([]string{"install-cni", "--plugin", plugin, "--cni-bin-dir", bin, "--cni-conf-dir", conf}, extra...)
		return run(args, &out, &errb), out.String(), errb.String()
	}
	if code, out, errs := install(); code != 0 || !strings.Contains(out, "installed "+filepath.Join(bin, "overlay-cni")) {
		t.Fatalf("install-cni: %d %q %q", code, out, errs)
	}
	st, err := os.Stat(filepath.Join(bin, "overlay-cni"))
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("installed plugin: %v, %v; want mode 0755", st, err)
	}
	check := func(network string) {
		t.Helper()
		files, err := libcni.ConfFiles(conf, []string{".conf", ".conflist", ".json"})
		if err != nil || len(files) != 1 {
			t.Fatalf("configuration files a runtime loads: %v, %v; want one", files, err)
		}
		list, err := libcni.ConfListFromFile(files[0])
		if err != nil {
			t.Fatal(err)
		}
		if list.Name != "overlay" || len(list.Plugins) != 1 || list.Plugins[0].Network.Type != "overlay-cni" || !strings.Contains(string(list.Plugins[0].Bytes), `"network":"`+network+`"`) {
			t.Fatalf("configuration %s: %+v %s", files[0], list, list.Plugins[0].Bytes)
		}
		for _, d := range []string{bin, conf} {
			entries, _ := os.ReadDir(d)
			for _, e := range entries {
				if strings.HasPrefix(e.Name(), ".") {
					t.Errorf("temporary file %s left in %s", e.Name(), d)
				}
			}
		}
	}
	check("default")
	if code, _, errs := install("--network", "red"); code != 0 {
		t.Fatalf("install-cni again: %d %q", code, errs)
	}
	check("red")

	notDir := filepath.Join(dir, "file")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		code int
		says string
	}{
		{[]string{"--cni-conf-dir", filepath.Join(notDir, "net.d")}, 1, "--cni-conf-dir"},
		{[]string{"--cni-bin-dir", filepath.Join(notDir, "bin")}, 1, "--cni-bin-dir"},
		{[]string{"--plugin", filepath.Join(dir, "missing")}, 1, "--plugin"},
		{[]string{"--network", "Bad!"}, 2, "--network"},
		{[]string{"--conf-name", "overlay.conf"}, 2, "--conf-name"},
		{[]string{"extra"}, 2, "unexpected"},
	} {
		if code, _, errs := install(tc.args...); code != tc.code || !strings.Contains(errs, tc.says) {
			t.Errorf("install-cni %q: exit %d, %q; want %d naming %s", tc.args, code, errs, tc.code, tc.says)
		}
	}
}
