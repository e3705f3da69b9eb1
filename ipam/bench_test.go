package ipam_test

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/overlaynet/overlay/ipam"
	"github.com/overlaynet/overlay/ipam/local"
	"github.com/overlaynet/overlay/overlay"
)

// fixedLeaser holds a fixed set of blocks and claims none: allocation
// from held blocks, with no store.
type fixedLeaser struct{ blocks []netip.Prefix }

func (l fixedLeaser) Held() []netip.Prefix { return append([]netip.Prefix(nil), l.blocks...) }
func (l fixedLeaser) Claim(context.Context, netip.Prefix, func(netip.Prefix) bool) (netip.Prefix, error) {
	return netip.Prefix{}, overlay.ErrPoolExhausted
}
func (l fixedLeaser) Give(context.Context, netip.Prefix) error       { return nil }
func (l fixedLeaser) Verify(context.Context) ([]netip.Prefix, error) { return nil, nil }

// BenchmarkAllocate measures one allocation from held blocks as an ADD
// makes it: Allocate, then Flush to the host's file before the answer.
// The host holds 16 blocks of /26 and keeps about 500 containers: each
// operation also releases the address of the container 500 before it
// (unflushed, as a DEL's release rides the next flush). Serial is one
// request at a time; Concurrent64 is 64 at a time, whose flushes are
// shared.
func BenchmarkAllocate(b *testing.B) {
	ctx := context.Background()
	n := overlay.Network{Name: "default", CIDR: netip.MustParsePrefix("10.0.0.0/16"), BlockBits: 26, VNI: 1, Port: 4789}
	setup := func(b *testing.B) *ipam.Pool {
		db, err := local.Open(filepath.Join(b.TempDir(), "alloc.db"), "h")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { db.Close() })
		var blocks []netip.Prefix
		for i := range 16 {
			blocks = append(blocks, n.Block(i))
		}
		p, err := ipam.New(ipam.Config{Network: n, Host: "h", MaxBlocks: 16}, fixedLeaser{blocks}, func(usable func() []netip.Prefix) (ipam.Book, error) {
			a, _, err := db.Allocator(n, "h", usable)
			return a, err
		})
		if err != nil {
			b.Fatal(err)
		}
		return p
	}
	const population = 500
	key := func(i int64) overlay.AttachmentKey {
		return overlay.AttachmentKey{ContainerID: fmt.Sprintf("c%d", i), IfName: "eth0"}
	}
	add := func(p *ipam.Pool, i int64) error {
		if _, err := p.Allocate(ctx, key(i), overlay.Endpoint{}); err != nil {
			return err
		}
		if err := p.Flush(ctx); err != nil {
			return err
		}
		if i >= population {
			return p.Release(ctx, key(i-population))
		}
		return nil
	}
	b.Run("Serial", func(b *testing.B) {
		p := setup(b)
		for i := int64(0); b.Loop(); i++ {
			if err := add(p, i); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "allocs/s")
	})
	b.Run("Concurrent64", func(b *testing.B) {
		p := setup(b)
		var next atomic.Int64
		procs := runtime.GOMAXPROCS(0)
		b.SetParallelism((64 + procs - 1) / procs)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := add(p, next.Add(1)-1); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "allocs/s")
	})
}
