package metrics

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMetrics(t *testing.T) {
	m := New()
	peers := 3.0
	m.GaugeFunc("dataplane", "peers", "Other hosts programmed.", prometheus.Labels{"network": "default"}, func() float64 { return peers })
	m.CNIRequests.WithLabelValues("add", "200").Inc()
	m.CNIDuration.WithLabelValues("add").Observe(0.004)

	want := `
# HELP overlay_dataplane_peers Other hosts programmed.
# TYPE overlay_dataplane_peers gauge
overlay_dataplane_peers{network="default"} 3
# HELP overlay_cni_requests_total CNI socket requests by operation and HTTP status of the answer (200 is success).
# TYPE overlay_cni_requests_total counter
overlay_cni_requests_total{op="add",status="200"} 1
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want), "overlay_dataplane_peers", "overlay_cni_requests_total"); err != nil {
		t.Fatal(err)
	}
	// The gauge is read at scrape time.
	peers = 1
	want = `
# HELP overlay_dataplane_peers Other hosts programmed.
# TYPE overlay_dataplane_peers gauge
overlay_dataplane_peers{network="default"} 1
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want), "overlay_dataplane_peers"); err != nil {
		t.Fatal(err)
	}
}

func TestGroup(t *testing.T) {
	m := New()
	red := m.Group(prometheus.Labels{"network": "red"})
	blue := m.Group(prometheus.Labels{"network": "blue"})
	red.GaugeFunc("ipam", "blocks", "Blocks.", func() float64 { return 1 })
	blue.GaugeFunc("ipam", "blocks", "Blocks.", func() float64 { return 2 })
	want := `
# HELP overlay_ipam_blocks Blocks.
# TYPE overlay_ipam_blocks gauge
overlay_ipam_blocks{network="blue"} 2
overlay_ipam_blocks{network="red"} 1
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want), "overlay_ipam_blocks"); err != nil {
		t.Fatal(err)
	}
	red.Unregister()
	// A network created again under the same name registers again.
	again := m.Group(prometheus.Labels{"network": "red"})
	again.GaugeFunc("ipam", "blocks", "Blocks.", func() float64 { return 3 })
	want = `
# HELP overlay_ipam_blocks Blocks.
# TYPE overlay_ipam_blocks gauge
overlay_ipam_blocks{network="blue"} 2
overlay_ipam_blocks{network="red"} 3
`
	if err := testutil.GatherAndCompare(m.Registry, strings.NewReader(want), "overlay_ipam_blocks"); err != nil {
		t.Fatal(err)
	}
}
