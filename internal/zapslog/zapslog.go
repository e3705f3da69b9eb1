// Package zapslog sends the logs of libraries that log through zap (the
// etcd client and server) to a slog.Handler, so that overlayd has one log,
// in one format, filtered by one level.
package zapslog

import (
	"context"
	"log/slog"
	"maps"
	"slices"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// New returns a zap logger that writes its entries at min and above to h,
// at the matching slog level, with its fields as attributes and its name
// (such as "etcd-client") as the attribute "logger".
func New(h slog.Handler, min zapcore.Level) *zap.Logger {
	return zap.New(&core{h: h, min: min})
}

// core is a zapcore.Core over a slog.Handler.
type core struct {
	h      slog.Handler
	min    zapcore.Level
	fields []zapcore.Field
}

func (c *core) Enabled(l zapcore.Level) bool {
	return l >= c.min && c.h.Enabled(context.Background(), level(l))
}

func (c *core) With(fields []zapcore.Field) zapcore.Core {
	return &core{h: c.h, min: c.min, fields: append(slices.Clip(c.fields), fields...)}
}

func (c *core) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *core) Write(e zapcore.Entry, fields []zapcore.Field) error {
	r := slog.NewRecord(e.Time, level(e.Level), e.Message, 0)
	if e.LoggerName != "" {
		r.AddAttrs(slog.String("logger", e.LoggerName))
	}
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range c.fields {
		f.AddTo(enc)
	}
	for _, f := range fields {
		f.AddTo(enc)
	}
	for _, k := range slices.Sorted(maps.Keys(enc.Fields)) {
		r.AddAttrs(slog.Any(k, enc.Fields[k]))
	}
	return c.h.Handle(context.Background(), r)
}

func (c *core) Sync() error { return nil }

// level is the slog level of a zap level: DPanic, Panic and Fatal are
// errors (zap itself panics or exits after writing them).
func level(l zapcore.Level) slog.Level {
	switch {
	case l <= zapcore.DebugLevel:
		return slog.LevelDebug
	case l == zapcore.InfoLevel:
		return slog.LevelInfo
	case l == zapcore.WarnLevel:
		return slog.LevelWarn
	}
	return slog.LevelError
}
