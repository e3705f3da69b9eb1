package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/overlay"
)

// installOptions say what install-cni puts where.
type installOptions struct {
	plugin   string // the overlay-cni binary to install
	binDir   string // the runtime's CNI_PATH
	confDir  string // the runtime's configuration directory
	confName string // the conflist's file name
	name     string // the CNI network's name
	network  string // the overlay network
	socket   string // overlayd's socket
}

// parseInstall parses install-cni's flags.
func parseInstall(args []string, stderr io.Writer) (installOptions, error) {
	var o installOptions
	fs := flag.NewFlagSet("overlayd install-cni", flag.ContinueOnError)
	fs.SetOutput(stderr)
	self, _ := os.Executable()
	fs.StringVar(&o.plugin, "plugin", filepath.Join(filepath.Dir(self), "overlay-cni"), "the overlay-cni binary to install; the default is the one beside overlayd")
	fs.StringVar(&o.binDir, "cni-bin-dir", "/opt/cni/bin", "directory the runtime finds CNI plugins in")
	fs.StringVar(&o.confDir, "cni-conf-dir", "/etc/cni/net.d", "directory the runtime reads CNI network configurations from")
	fs.StringVar(&o.confName, "conf-name", "10-overlay.conflist", "file name of the configuration list; runtimes take the first in lexical order")
	fs.StringVar(&o.name, "name", "overlay", "the CNI network's name, which runtimes select networks by")
	fs.StringVar(&o.network, "network", "default", "the overlay network the configuration attaches containers to")
	fs.StringVar(&o.socket, "socket", cnirpc.DefaultSocket, "overlayd's CNI socket, written into the configuration")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("install-cni: unexpected arguments %q", fs.Args())
	}
	if err := overlay.ValidateName(o.network); err != nil {
		return o, fmt.Errorf("install-cni --network: %w", err)
	}
	if o.confName == "" || filepath.Base(o.confName) != o.confName || filepath.Ext(o.confName) != ".conflist" {
		return o, fmt.Errorf("install-cni --conf-name %q: want a file name ending in .conflist", o.confName)
	}
	return o, nil
}

// conflist returns the configuration list install-cni writes.
func (o installOptions) conflist() ([]byte, error) {
	type plugin struct {
		Type         string          `json:"type"`
		Network      string          `json:"network"`
		Socket       string          `json:"socket"`
		Capabilities map[string]bool `json:"capabilities"`
	}
	list := struct {
		CNIVersion string   `json:"cniVersion"`
		Name       string   `json:"name"`
		Plugins    []plugin `json:"plugins"`
	}{"1.1.0", o.name, []plugin{{Type: "overlay-cni", Network: o.network, Socket: o.socket,
		Capabilities: map[string]bool{"ips": true, "mac": true, "labels": true}}}}
	b, err := json.MarshalIndent(list, "", "  ")
	return append(b, '\n'), err
}

// installCNI puts the plugin binary into the bin directory and the
// configuration list into the configuration directory, each atomically:
// written to a hidden temporary file in the same directory, synced, and
// renamed over the old one, so that a runtime that looks meanwhile finds
// the old file or the new one, never half of one. It returns the paths it
// wrote.
func installCNI(o installOptions) ([]string, error) {
	bin, err := os.Open(o.plugin)
	if err != nil {
		return nil, fmt.Errorf("install-cni: the plugin binary (--plugin): %w", err)
	}
	defer bin.Close()
	conf, err := o.conflist()
	if err != nil {
		return nil, fmt.Errorf("install-cni: encode the configuration: %w", err)
	}
	binPath := filepath.Join(o.binDir, "overlay-cni")
	if err := writeAtomic(binPath, 0o755, bin); err != nil {
		return nil, fmt.Errorf("install-cni: the plugin (--cni-bin-dir): %w", err)
	}
	confPath := filepath.Join(o.confDir, o.confName)
	if err := writeAtomic(confPath, 0o644, bytes.NewReader(conf)); err != nil {
		return []string{binPath}, fmt.Errorf("install-cni: the configuration (--cni-conf-dir): %w", err)
	}
	return []string{binPath, confPath}, nil
}

// writeAtomic replaces path with what r holds, with mode perm.
func writeAtomic(path string, perm os.FileMode, r io.Reader) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// A leading dot and no .conf/.conflist/.json extension: a runtime
	// neither loads nor executes the temporary file.
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := io.Copy(tmp, r); err != nil {
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, os.ErrInvalid) {
		return err
	}
	return nil
}

// runInstall runs install-cni: exit 0 once both files are in place, 1
// when one could not be written, 2 for a usage error.
func runInstall(args []string, stdout, stderr io.Writer) int {
	o, err := parseInstall(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "overlayd: %v\n", err)
		return 2
	}
	wrote, err := installCNI(o)
	for _, p := range wrote {
		fmt.Fprintf(stdout, "installed %s\n", p)
	}
	if err != nil {
		fmt.Fprintf(stderr, "overlayd: %v\n", err)
		return 1
	}
	return 0
}
