package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/overlaynet/overlay/cnirpc/rpcserver"
	"github.com/overlaynet/overlay/overlay"
)

func TestLoadIdentityIsStable(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	id, err := LoadIdentity(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(id) != 2*hostIDBytes {
		t.Fatalf("host ID %q: want %d hex digits", id, 2*hostIDBytes)
	}
	again, err := LoadIdentity(dir)
	if err != nil || again != id {
		t.Fatalf("second load = %q, %v; want %q", again, err, id)
	}
	fi, err := os.Stat(dir)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("data dir mode = %v, %v; want 0700", fi.Mode().Perm(), err)
	}
}

func TestLoadIdentityConcurrentFirstStart(t *testing.T) {
	dir := t.TempDir()
	ids := make([]overlay.HostID, 8)
	var wg sync.WaitGroup
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if ids[i], err = LoadIdentity(dir); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	for _, id := range ids[1:] {
		if id != ids[0] {
			t.Fatalf("concurrent first starts kept different IDs: %v", ids)
		}
	}
}

func TestLoadIdentityRejectsMalformed(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, hostIDFile), []byte("not/an id\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadIdentity(dir); err == nil || !strings.Contains(err.Error(), "malformed") {
		t.Fatalf("malformed host ID: %v", err)
	}
}

func TestVTEPMAC(t *testing.T) {
	a, b := VTEPMAC("host-a"), VTEPMAC("host-b")
	if a.String() != VTEPMAC("host-a").String() {
		t.Fatal("VTEP MAC is not stable")
	}
	if a.String() == b.String() {
		t.Fatal("two hosts share a VTEP MAC")
	}
	if a[0]&0x02 == 0 || a[0]&0x01 != 0 {
		t.Fatalf("%s is not a locally administered unicast MAC", a)
	}
}

// testMTU is the MTU of testNet's containers.
// TestSocketWriteTimeoutCoversADD: the socket's write timeout is no
// shorter than the longest ADD overlayd serves: a body read within the
// read timeout, then an allocation and a flush bounded by storeTimeout
// each.
func TestSocketWriteTimeoutCoversADD(t *testing.T) {
	cfg := rpcserver.DefaultServerConfig()
	if need := cfg.ReadTimeout + 2*storeTimeout; cfg.WriteTimeout < need {
		t.Errorf("WriteTimeout %s cuts an ADD that takes %s", cfg.WriteTimeout, need)
	}
}
