package zapslog

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func TestNew(t *testing.T) {
	var buf bytes.Buffer
	h := slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})
	log := New(h, zapcore.WarnLevel).Named("etcd-client").With(zap.String("target", "etcd-endpoints://0x1"))
	log.Info("dropped: below the level")
	log.Warn("retrying of unary invoker failed", zap.Error(errors.New("connection refused")), zap.Int("attempt", 3))
	log.Error("lost leader")
	out := buf.String()
	if strings.Contains(out, "dropped") {
		t.Errorf("an entry below the level was written:\n%s", out)
	}
	for _, want := range []string{
		`level=WARN msg="retrying of unary invoker failed" logger=etcd-client attempt=3 error="connection refused" target=etcd-endpoints://0x1`,
		`level=ERROR msg="lost leader" logger=etcd-client target=etcd-endpoints://0x1`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("no %q in\n%s", want, out)
		}
	}
	// The handler's own level counts too.
	buf.Reset()
	quiet := New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelError}), zapcore.DebugLevel)
	quiet.Warn("below the handler's level")
	if buf.Len() != 0 {
		t.Errorf("written below the handler's level: %s", buf.String())
	}
}
