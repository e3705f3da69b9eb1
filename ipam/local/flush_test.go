package local

import (
	"context"
	"net/netip"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/overlaynet/overlay/overlay"
)

// TestFailedFlushIsRetried: the changes of a flush that failed are
// committed, in order, by the next one.
func TestFailedFlushIsRetried(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "alloc.db")
	db, err := Open(path, "a")
	if err != nil {
		t.Fatal(err)
	}
	n := overlay.Network{Name: "default", CIDR: netip.MustParsePrefix("198.19.0.0/16"), BlockBits: 29, VNI: 4096, Port: 4789}
	a, _, err := db.Allocator(n, "a", func() []netip.Prefix { return []netip.Prefix{netip.MustParsePrefix("198.19.0.8/29")} })
	if err != nil {
		t.Fatal(err)
	}
	k := func(id string) overlay.AttachmentKey { return overlay.AttachmentKey{ContainerID: id, IfName: "eth0"} }
	for _, id := range []string{"c1", "c2"} {
		if _, err := a.Allocate(ctx, k(id), overlay.Endpoint{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Release(ctx, k("c1")); err != nil {
		t.Fatal(err)
	}
	db.db.Close() // the disk fails
	if err := a.Flush(ctx); err == nil {
		t.Fatal("a flush on a closed file succeeded")
	}
	if db.db, err = bolt.Open(path, 0o600, nil); err != nil { // and recovers
		t.Fatal(err)
	}
	defer db.Close()
	if err := a.Flush(ctx); err != nil {
		t.Fatalf("the flush after the failure = %v", err)
	}
	var got []string
	db.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketName(n.Name)).ForEach(func(k, v []byte) error {
			got = append(got, string(k)+"="+string(v))
			return nil
		})
	})
	if len(got) != 1 || got[0] != "c2/eth0=198.19.0.11/29" {
		t.Fatalf("on disk after the retried flush: %v; want c2 alone on .11", got)
	}
}
