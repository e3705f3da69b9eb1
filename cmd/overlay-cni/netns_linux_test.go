//go:build linux

package main

import (
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"
)

// notNetNSPaths returns paths that exist but are not network namespaces,
// with what each is, made for t where they need to be. The procfs ones
// are mistakes a runtime could make next to /proc/<pid>/ns/net.
func notNetNSPaths(t *testing.T) map[string]string {
	t.Helper()
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	return map[string]string{
		file:                "a regular file",
		dir:                 "a directory",
		fifo:                "a named pipe",
		os.DevNull:          "a character device",
		"/proc/self/ns":     "a directory",
		"/proc/self/status": "a regular file",
	}
}

// wantCode8 fails t unless err is the CNI error with code 8 whose message
// names path and says it is not a network namespace but what.
func wantCode8(t *testing.T, err error, path, what string) {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) || e.Code != types.ErrInvalidNetNS {
		t.Fatalf("error %v, want code %d", err, types.ErrInvalidNetNS)
	}
	want := `CNI_NETNS "` + path + `" is not a network namespace: it is ` + what
	if e.Msg != want {
		t.Fatalf("message %q, want %q", e.Msg, want)
	}
	if !strings.Contains(e.Details, "/run/netns/") {
		t.Fatalf("details %q do not say what to pass instead", e.Details)
	}
}

// TestOpenNetNS: a network namespace opens; a path that exists but is
// not one gives code 8 saying what it is, without blocking on a named
// pipe; a path that does not exist gives code 8 too.
func TestOpenNetNS(t *testing.T) {
	ns, err := openNetNS("/proc/self/ns/net")
	if err != nil {
		t.Fatalf("the test's own network namespace: %v", err)
	}
	_, err = unix.IoctlRetInt(int(ns), unix.NS_GET_NSTYPE)
	tellsType := !errors.Is(err, unix.ENOTTY)
	ns.Close()

	for path, what := range notNetNSPaths(t) {
		t.Run(what, func(t *testing.T) {
			done := make(chan error, 1)
			go func() {
				ns, err := openNetNS(path)
				if err == nil {
					ns.Close()
				}
				done <- err
			}()
			select {
			case err := <-done:
				wantCode8(t, err, path, what)
			case <-time.After(10 * time.Second):
				t.Fatalf("openNetNS(%s) blocks", path)
			}
		})
	}

	t.Run("a namespace of another type", func(t *testing.T) {
		if !tellsType {
			t.Skip("this kernel (before 4.11) does not tell a namespace's type: setns(2) does")
		}
		_, err := openNetNS("/proc/self/ns/mnt")
		wantCode8(t, err, "/proc/self/ns/mnt", "a mount namespace")
	})

	t.Run("missing", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "gone")
		_, err := openNetNS(path)
		var e *types.Error
		if !errors.As(err, &e) || e.Code != types.ErrInvalidNetNS || !strings.Contains(e.Msg, path) {
			t.Fatalf("openNetNS of a missing path = %v, want code 8 naming it", err)
		}
	})
}

// fakeOverlayd answers every request on a Unix socket with an empty JSON
// object and records the paths asked for. It is safe for concurrent use.
type fakeOverlayd struct {
	socket string

	mu    sync.Mutex // guards the field below
	paths []string
}

func newFakeOverlayd(t *testing.T) *fakeOverlayd {
	t.Helper()
	// Not t.TempDir: its paths can exceed a socket address's 108 bytes.
	dir, err := os.MkdirTemp("", "ovl-cni-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f := &fakeOverlayd{socket: filepath.Join(dir, "overlayd.sock")}
	l, err := net.Listen("unix", f.socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.paths = append(f.paths, r.URL.Path)
		f.mu.Unlock()
		w.Write([]byte("{}"))
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return f
}

// requests returns the paths asked for so far, and forgets them.
func (f *fakeOverlayd) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := f.paths
	f.paths = nil
	return p
}

// TestVerbsWithNotANetNS: ADD and CHECK with a CNI_NETNS that is not a
// network namespace give code 8 before they ask overlayd anything; DEL
// does not open CNI_NETNS, so it succeeds as for a namespace that is gone.
func TestVerbsWithNotANetNS(t *testing.T) {
	f := newFakeOverlayd(t)
	conf := []byte(`{"cniVersion":"1.1.0","name":"overlay","type":"overlay-cni","socket":"` + f.socket + `"}`)
	p := &plugin{}
	for path, what := range notNetNSPaths(t) {
		t.Run(what, func(t *testing.T) {
			args := &skel.CmdArgs{ContainerID: "notnetns", Netns: path, IfName: "eth0", StdinData: conf}
			wantCode8(t, p.cmdAdd(args), path, what)
			wantCode8(t, p.cmdCheck(args), path, what)
			if got := f.requests(); len(got) != 0 {
				t.Fatalf("ADD and CHECK asked overlayd %v", got)
			}
			if err := p.cmdDel(args); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if got := f.requests(); len(got) != 1 || !strings.HasSuffix(got[0], "/del") {
				t.Fatalf("DEL asked overlayd %v, want one del", got)
			}
		})
	}
}
