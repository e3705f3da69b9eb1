package etcd_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

// reportPercentiles reports the median and the 99th percentile of ds, in
// milliseconds.
func reportPercentiles(b *testing.B, ds []time.Duration) {
	if len(ds) == 0 {
		return
	}
	slices.Sort(ds)
	at := func(q float64) float64 {
		return float64(ds[min(len(ds)-1, int(q*float64(len(ds))))]) / float64(time.Millisecond)
	}
	b.ReportMetric(at(0.50), "p50-ms")
	b.ReportMetric(at(0.99), "p99-ms")
}

// BenchmarkFirstBlock measures a new host's first block against an
// embedded etcd that already holds the blocks of 1000 hosts: Claim alone,
// and Lease, which is what a host does at start (it reads the blocks it
// may hold, then claims one).
func BenchmarkFirstBlock(b *testing.B) {
	ctx := context.Background()
	s := etcd.NewStore(startEtcd(b), "")
	// 65536 blocks, the most a network has: the benchmark's own claims
	// leave it sparse, as a cluster's network is. (In a network half
	// claimed, a claim's blind tries fail half the time.)
	n := overlay.Network{Name: "default", CIDR: netip.MustParsePrefix("10.0.0.0/10"), BlockBits: 26, VNI: 1, Port: 4789}
	if _, err := s.EnsureNetwork(ctx, n); err != nil {
		b.Fatal(err)
	}
	for i := range 1000 {
		if _, err := s.Pool(n, overlay.HostID(fmt.Sprintf("old%d", i))).Claim(ctx, netip.Prefix{}, nil); err != nil {
			b.Fatal(err)
		}
	}
	for _, bc := range []struct {
		name  string
		first func(*etcd.Pool) error
	}{
		{"Claim", func(p *etcd.Pool) error { _, err := p.Claim(ctx, netip.Prefix{}, nil); return err }},
		{"Lease", func(p *etcd.Pool) error { _, err := p.Lease(ctx); return err }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var ds []time.Duration
			for i := 0; b.Loop(); i++ {
				p := s.Pool(n, overlay.HostID(fmt.Sprintf("%s%d", bc.name, i)))
				t0 := time.Now()
				if err := bc.first(p); err != nil {
					b.Fatal(err)
				}
				ds = append(ds, time.Since(t0))
			}
			reportPercentiles(b, ds)
		})
	}
}

// BenchmarkThousandHostsFirstBlock measures 1000 new hosts claiming their
// first block at the same moment against one embedded etcd: one
// operation is all 1000, each in a network of its own (a key prefix of
// its own) with 4096 blocks.
func BenchmarkThousandHostsFirstBlock(b *testing.B) {
	ctx := context.Background()
	cli := startEtcd(b)
	n := overlay.Network{Name: "default", CIDR: netip.MustParsePrefix("10.64.0.0/14"), BlockBits: 26, VNI: 1, Port: 4789}
	var ds []time.Duration
	for i := 0; b.Loop(); i++ {
		s := etcd.NewStore(cli, fmt.Sprintf("/bench/%d/", i))
		if _, err := s.EnsureNetwork(ctx, n); err != nil {
			b.Fatal(err)
		}
		pools := make([]*etcd.Pool, 1000)
		for h := range pools {
			pools[h] = s.Pool(n, overlay.HostID(fmt.Sprintf("h%d", h)))
		}
		start := make(chan struct{})
		errs := make(chan error, len(pools))
		var wg sync.WaitGroup
		for _, p := range pools {
			wg.Go(func() {
				<-start
				_, err := p.Lease(ctx)
				errs <- err
			})
		}
		t0 := time.Now()
		close(start)
		wg.Wait()
		ds = append(ds, time.Since(t0))
		close(errs)
		for err := range errs {
			if err != nil {
				b.Fatal(err)
			}
		}
	}
	reportPercentiles(b, ds)
}
