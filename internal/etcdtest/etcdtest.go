// Package etcdtest starts embedded etcd servers for tests.
package etcdtest

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/ipam/etcd/embedded"
)

// Config returns the configuration of an embedded etcd on Unix sockets in
// a new temporary directory (no TCP port, so tests never collide),
// removed when the test ends: for a test that stops and starts the server
// itself.
func Config(t testing.TB) embedded.Config {
	t.Helper()
	// Not t.TempDir: its long path would exceed the length of a Unix
	// socket's address.
	dir, err := os.MkdirTemp("", "ovl-etcd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return embedded.Config{
		Dir:       dir,
		ClientURL: "unix://" + filepath.Join(dir, "client.sock"),
		PeerURL:   "unix://" + filepath.Join(dir, "peer.sock"),
	}
}

// Start starts an embedded etcd (Config) and returns a client of it. The
// server, the client and the directory are removed when the test ends.
func Start(t testing.TB) *clientv3.Client {
	t.Helper()
	ctx := context.Background()
	e, err := embedded.Start(ctx, Config(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	cli, err := etcd.Connect(ctx, etcd.ClientConfig{Endpoints: []string{e.ClientURL}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}
